"""Work-arounds for the Triton interpreter (TRITON_INTERPRET=1), applied by the kernel modules on import.

numpy >= 2.4 refuses int() on a 1-element 1-D array, and the interpreter of triton <= 3.6 keeps every scalar
(program ids, integer arguments) as such an array, so any loop whose bounds depend on a runtime value fails with
"only 0-dimensional arrays can be converted to Python scalars" (triton-lang/triton#9171, fixed upstream by #9172).
The shim re-defines the interpreter's tensor __index__ the way the upstream fix does. It is a no-op when the
interpreter is not enabled, when numpy still converts such arrays, or when triton has fixed it.
"""
import os


def apply() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
        return  # numpy < 2.4: the interpreter works as is
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_igpt_index_fix", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    _patch_lang_tensor._igpt_index_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor

"""The op families, one module each: the reference, the torch.library op and the dispatch.

The public functions are re-exported by the ``fastdit`` package itself (``fastdit.patchify``
is the function, ``fastdit.ops.patchify`` the family's module).
"""

from . import adaln, downsampled_attention, patchify

__all__ = ["adaln", "downsampled_attention", "patchify"]

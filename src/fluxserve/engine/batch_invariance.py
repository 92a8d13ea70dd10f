"""Make a batched pipeline call give each image exactly the bits of its solo call.

A batch of prompts shares every token-level matrix product with the solo call's shapes per row
(the rows of a ``(B, L, K)`` input are computed alike whatever ``B`` is), but two places change
kernel with the batch size, measured on the FLUX.2 klein pipelines (CPU, fp32):

* matrix products on per-image *vectors* (timestep embedding, AdaLN modulation): a ``(1, K)``
  input runs a matrix-vector kernel, a ``(B, K)`` input a matrix-matrix kernel with another
  summation order (about 1e-7 apart, amplified over the steps to about 1e-5 in the image);
* VAE convolutions, whose algorithm is chosen per batch size.

:func:`make_batch_invariant` fixes both in place: linear layers of the transformer compute a
``(B, K)`` input one row at a time (``B`` matrix-vector products: negligible next to the token
products), and the VAE decodes one image at a time (diffusers' "slicing"). A batch of one takes
the plain path, so solo calls are unchanged. Measured on CPU: batched images then equal solo
images bit for bit (tests/test_batching.py). Whether the GPU's token-level kernels are
batch-invariant too is what ``bench/service_vs_bare.py --setting max_batch_size=N`` reports.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

_MARK = "_fluxserve_batch_invariant"


def _rowwise_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and x.shape[0] > 1:
        return torch.cat([F.linear(row, self.weight, self.bias) for row in x.split(1)])
    return F.linear(x, self.weight, self.bias)


def make_batch_invariant(pipeline: Any) -> None:
    """Idempotent; the modules are changed in place (shared with ``from_pipe`` twins)."""
    transformer = getattr(pipeline, "transformer", None)
    if transformer is not None and not getattr(transformer, _MARK, False):
        _rowwise_linears(transformer)
        setattr(transformer, _MARK, True)
    vae = getattr(pipeline, "vae", None)
    if vae is not None and hasattr(vae, "use_slicing"):
        vae.use_slicing = True


def make_new_linears_batch_invariant(pipeline: Any) -> None:
    """After layers were added to a batch-invariant transformer (a LoRA adapter's ``lora_A`` /
    ``lora_B``): make those row-wise too. Nothing happens to a transformer that was not made
    batch-invariant."""
    transformer = getattr(pipeline, "transformer", None)
    if transformer is not None and getattr(transformer, _MARK, False):
        _rowwise_linears(transformer)


def _rowwise_linears(module: torch.nn.Module) -> None:
    for child in module.modules():
        if type(child) is torch.nn.Linear and "forward" not in child.__dict__:
            child.forward = types.MethodType(_rowwise_linear, child)  # type: ignore[method-assign]  # deliberate per-instance override

"""transformers internals the ``bard_vl`` model relies on (transformers 5.18; no NeMo).

* :class:`FlexAttentionSupport` declares FlexAttention support on the bard_vl classes. transformers
  5.18 refuses ``attn_implementation="flex_attention"`` for any class whose ``_supports_flex_attn`` is
  unset, Qwen3-VL's text decoder included, although that decoder's attention goes through the generic
  attention interface and matches SDPA with the equivalent dense mask (tests/test_model.py).
* :func:`attn_implementation` reads the attention backend a (sub-)config was resolved to; eager
  attention adds the mask to the scores, so a boolean block mask must become additive there.
"""

from __future__ import annotations

from typing import Any

from nemo_bard.integrations import check_version

check_version("transformers")


class FlexAttentionSupport:
    """Mixin for a ``PreTrainedModel`` subclass whose attention works with FlexAttention ``BlockMask`` inputs."""

    _supports_flex_attn = True


def attn_implementation(config: Any) -> str:
    """Attention backend a config was resolved to (``sdpa``, ``eager``, ``flex_attention``...; default ``sdpa``)."""
    return getattr(config, "_attn_implementation", None) or "sdpa"


__all__ = ["FlexAttentionSupport", "attn_implementation"]

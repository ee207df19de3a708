"""What the Qwen vision-language families share: their special tokens, ChatML and rotary split.

The families (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_5``), the vocabularies
(``backbone/vocab.py``) and the embedded test model (``backbone/tiny.py``) read these from here.
"""

from __future__ import annotations

# Qwen2/2.5's special tokens, in the order of their ids (151643..151664 in the real vocabulary).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Qwen-style ChatML. Unlike Qwen's own template no default system message is inserted: prompts for
# the embedded models stay short, and a caller who wants one passes a system turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def mrope_section(rotary_dim: int, time_share: int = 4) -> list[int]:
    """Split ``rotary_dim / 2`` frequencies over (time, height, width) like Qwen's 16/24/24 of 64.

    >>> mrope_section(32)
    [4, 6, 6]
    """
    half = rotary_dim // 2
    time = half // time_share
    height = (half - time) // 2
    return [time, height, half - time - height]

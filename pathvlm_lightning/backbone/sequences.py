"""Pure tensor helpers for prompts and completions (no model inside; unit-testable by hand).

Layout conventions used across the backbone:
- prompt inputs are the processor output for B left-padded prompts: ``input_ids`` [B, P],
  ``attention_mask`` [B, P], ``pixel_values`` [sum of patches, C] (images in row order),
  ``image_grid_thw`` [N, 3];
- completions are [B*G, L]; rows ``i*G .. i*G+G-1`` belong to prompt ``i``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

_IMAGE_KEYS = ("pixel_values", "image_grid_thw")
_VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def images_per_row(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor, image_token_id: int, merge_size: int
) -> list[int]:
    """How many of the (row-ordered) images each prompt row holds, from its count of image tokens.

    A [1, 4, 4] grid is 16 patches, 4 tokens after the 2x2 merge; [1, 2, 2] is 1 token. Row 0
    holds 4 image tokens (one image), row 1 holds 5 (4 + 1: two images).

    >>> ids = torch.tensor([[0, 9, 9, 9, 9], [9, 9, 9, 9, 9]])
    >>> images_per_row(ids, torch.tensor([[1, 4, 4], [1, 4, 4], [1, 2, 2]]), image_token_id=9, merge_size=2)
    [1, 2]
    """
    tokens_per_image = (image_grid_thw.prod(-1) // merge_size**2).tolist()  # [N]
    counts: list[int] = []
    image = 0
    for row, row_tokens in enumerate((input_ids == image_token_id).sum(-1).tolist()):
        start, seen = image, 0
        while seen < row_tokens and image < len(tokens_per_image):
            seen += tokens_per_image[image]
            image += 1
        if seen != row_tokens:
            raise ValueError(
                f"prompt row {row} has {row_tokens} image tokens, which does not match the image_grid_thw "
                f"of images {start}..{image - 1} ({tokens_per_image[start:image]} tokens each)"
            )
        counts.append(image - start)
    if image != len(tokens_per_image):
        raise ValueError(f"image_grid_thw lists {len(tokens_per_image)} images but the prompts hold only {image}")
    return counts


def expanded_image_order(counts: Sequence[int], num_generations: int) -> list[int]:
    """Indices of the B prompts' images in the order the B*G expanded rows consume them.

    Prompt ``i`` holds ``counts[i]`` images; each of its G copies needs all of them in order, so a
    two-image prompt gives ``[A, B, A, B]``, never ``[A, A, B, B]``.

    >>> expanded_image_order([1, 2], num_generations=2)
    [0, 0, 1, 2, 1, 2]
    """
    order: list[int] = []
    start = 0
    for count in counts:
        order.extend(list(range(start, start + count)) * num_generations)
        start += count
    return order


def expand_prompt_inputs(
    inputs: Mapping[str, torch.Tensor], num_generations: int, *, image_token_id: int, merge_size: int
) -> dict[str, torch.Tensor]:
    """Repeat each prompt ``num_generations`` times: rows [B, ...] -> [B*G, ...].

    Flat ``pixel_values`` are regrouped per prompt, so prompt ``i``'s patch block (all its images)
    appears G times in a row, matching the order in which the model consumes image tokens;
    ``image_grid_thw`` follows the same order (also when ``pixel_values`` are left out).
    """
    if any(k in inputs for k in _VIDEO_KEYS):
        raise ValueError(f"video inputs are not supported by the backbone; got keys {sorted(inputs)}")
    g = num_generations
    if g < 1:
        raise ValueError(f"num_generations must be >= 1, got {g}")
    input_ids = inputs["input_ids"]  # [B, P]
    out = {k: v.repeat_interleave(g, dim=0) for k, v in inputs.items() if k not in _IMAGE_KEYS}
    grid = inputs.get("image_grid_thw")  # [N, 3]
    if grid is None:
        return out
    order = expanded_image_order(images_per_row(input_ids, grid, image_token_id, merge_size), g)
    out.update(pick_images(inputs, order))  # [N*G, 3] grid, its patches
    return out


def pick_images(inputs: Mapping[str, torch.Tensor], order: Sequence[int]) -> dict[str, torch.Tensor]:
    """``image_grid_thw`` [len(order), 3] and ``pixel_values`` of the images ``order`` names, in that
    order: the one rule by which image data is cut (``pixel_values`` holds every image's
    ``t*h*w`` patches back to back, so it is split by the grid's patch counts). ``pixel_values`` is
    left out when ``inputs`` has none.

    >>> grid = torch.tensor([[1, 1, 2], [1, 1, 1]])  # 2 patches, then 1
    >>> picked = pick_images({"image_grid_thw": grid, "pixel_values": torch.arange(3.0)[:, None]}, [1, 0, 1])
    >>> picked["pixel_values"].flatten().tolist(), picked["image_grid_thw"][:, 2].tolist()
    ([2.0, 0.0, 1.0, 2.0], [1, 2, 1])
    """
    grid = inputs["image_grid_thw"]  # [N, 3]
    out = {"image_grid_thw": grid[list(order)]}
    if inputs.get("pixel_values") is not None:
        patches = inputs["pixel_values"].split(grid.prod(-1).tolist())  # N x [t*h*w, C]
        out["pixel_values"] = torch.cat([patches[i] for i in order]) if order else inputs["pixel_values"][:0]
    return out


def mm_token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """Qwen2.5-VL's ``mm_token_type_ids``: 0 text, 1 image slot, 2 video slot, same shape as ids.

    The model needs them to build 3-D rotary positions; derived here from the ids so that training,
    generation and scoring agree even when a collator did not pass them.
    """
    types = torch.zeros_like(input_ids)
    types[input_ids == image_token_id] = 1
    types[input_ids == video_token_id] = 2
    return types


def replace_tokens(ids: torch.Tensor, token_ids: Sequence[int], replacement: int) -> torch.Tensor:
    """A copy of ``ids`` with every id in ``token_ids`` replaced.

    >>> replace_tokens(torch.tensor([1, 5, 2, 5]), [5, 2], 0).tolist()
    [1, 0, 0, 0]
    """
    found = torch.isin(ids, torch.tensor(list(token_ids), device=ids.device))
    return ids.masked_fill(found, replacement)


def completion_mask(completion_ids: torch.Tensor, eos_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real completion tokens and which completions never ended.

    Returns ``mask`` [B*G, L] long, 1 up to and including the first EOS (all ones when there is
    none), and ``truncated`` [B*G] bool, True where no EOS occurs.

    >>> mask, truncated = completion_mask(torch.tensor([[5, 2, 7], [5, 6, 7]]), eos_token_ids=[2])
    >>> mask.tolist(), truncated.tolist()
    ([[1, 1, 0], [1, 1, 1]], [False, True])
    """
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    length = completion_ids.shape[1]
    positions = torch.arange(length, device=completion_ids.device)  # [L]
    first_eos = torch.where(is_eos, positions, length).min(dim=1).values  # [B*G], L when none
    mask = (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).long()  # [B*G, L]
    return mask, ~is_eos.any(dim=1)


def pad_after_eos(completion_ids: torch.Tensor, eos_token_ids: Sequence[int], pad_token_id: int) -> torch.Tensor:
    """Every token after the first EOS set to ``pad_token_id``.

    >>> pad_after_eos(torch.tensor([[5, 2, 7, 2]]), eos_token_ids=[2], pad_token_id=0).tolist()
    [[5, 2, 0, 0]]
    """
    mask, _ = completion_mask(completion_ids, eos_token_ids)
    return completion_ids.masked_fill(mask == 0, pad_token_id)


def grouped_attention_mask(prompt_mask: torch.Tensor, num_generations: int, fed_length: int) -> torch.Tensor:
    """Which keys each query sees in the grouped sequences ``[prompt, c_1, ..., c_G]`` -> bool [B, 1, S, S].

    ``prompt_mask`` [B, P] marks real (1) and left-padding (0) prompt tokens; each completion block
    holds ``fed_length`` tokens, so S = P + G * fed_length. A query sees the real prompt tokens up
    to itself and the earlier tokens of its own block, never another completion's; every position
    also sees itself, so no row is empty (padding queries would otherwise give NaN in sdpa).

    Two prompt tokens (the first is padding), two blocks of two; rows are queries:

    >>> for row in grouped_attention_mask(torch.tensor([[0, 1]]), num_generations=2, fed_length=2)[0, 0].int():
    ...     print(row.tolist())
    [1, 0, 0, 0, 0, 0]
    [0, 1, 0, 0, 0, 0]
    [0, 1, 1, 0, 0, 0]
    [0, 1, 1, 1, 0, 0]
    [0, 1, 0, 0, 1, 0]
    [0, 1, 0, 0, 1, 1]
    """
    batch, prompt_length = prompt_mask.shape
    device = prompt_mask.device
    block = torch.arange(num_generations + 1, device=device).repeat_interleave(
        torch.tensor([prompt_length] + [fed_length] * num_generations, device=device)
    )  # [S]: 0 for the prompt, k for completion block k
    length = block.shape[0]
    position = torch.arange(length, device=device)
    causal = position.unsqueeze(1) >= position.unsqueeze(0)  # [S, S]: query row, key column
    visible_block = (block.unsqueeze(0) == 0) | (block.unsqueeze(0) == block.unsqueeze(1))  # [S, S]
    real_key = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(batch, length - prompt_length).bool()], dim=1)
    allowed = (causal & visible_block).unsqueeze(0) & real_key.unsqueeze(1)  # [B, S, S]
    allowed |= torch.eye(length, dtype=torch.bool, device=device)
    return allowed.unsqueeze(1)


def grouped_positions(prompt_positions: torch.Tensor, num_generations: int, fed_length: int) -> torch.Tensor:
    """Rotary positions [3, B, S] of the grouped sequences, from the prompt's own [3, B, P].

    Every completion continues where its prompt ends: token ``j`` of each block sits at the
    prompt's largest position + 1 + j, on all three (time, height, width) axes, as text after a
    prompt does in Qwen-VL's 3-D positions. Positions after an EOS are never attended to by a
    real token, so what they hold does not matter.

    >>> grouped_positions(torch.tensor([[[0, 0, 3, 4]]]).expand(3, 1, 4), 2, 2)[0].tolist()
    [[0, 0, 3, 4, 5, 6, 5, 6]]
    """
    start = prompt_positions.amax(dim=(0, 2)) + 1  # [B]
    completion = start.unsqueeze(1) + torch.arange(fed_length, device=start.device)  # [B, F]
    blocks = completion.repeat(1, num_generations)  # [B, G*F]
    return torch.cat([prompt_positions, blocks.unsqueeze(0).expand(3, -1, -1)], dim=2)


def grouped_token_index(prompt_length: int, num_generations: int, completion_length: int) -> torch.Tensor:
    """Where, in a grouped sequence, the hidden state predicting each completion token sits -> [G, L].

    Token 0 of every completion is predicted by the prompt's last position; token ``j > 0`` of
    completion ``k`` by its token ``j - 1``, at ``P + k * (L - 1) + j - 1`` (blocks hold the
    ``L - 1`` tokens that are fed).

    >>> grouped_token_index(prompt_length=3, num_generations=2, completion_length=3).tolist()
    [[2, 3, 4], [2, 5, 6]]
    """
    fed = completion_length - 1
    starts = prompt_length + fed * torch.arange(num_generations).unsqueeze(1)  # [G, 1]
    rest = starts + torch.arange(fed).unsqueeze(0)  # [G, L-1]
    return torch.cat([torch.full((num_generations, 1), prompt_length - 1), rest], dim=1)

"""Token budget of one image: visual tokens, KV cache and prefill FLOPs per request, per connector (`vlm tokens`).

Everything static is computed on the meta device, so real sizes (CLIP-L/14-336 + a 7B LLM) cost no memory: the
token count comes from the policy's one count (`VLMConfig.image_token_count`) and is cross-checked against an
actual weightless forward of the tower and connector over the image's crops, which also counts their FLOPs.
`measure` times the same request on this machine from a saved checkpoint.

Formulas (per request: one image of W x H px plus `text_tokens` text tokens, T tokens in all):
- KV cache: 2 (K and V) * layers * KV heads * head dim * bytes per value * T.
- LLM prefill FLOPs: 2 * matmul params * T (every Linear of the decoder layers: attention projections and MLP;
  embeddings excluded, they are a lookup) + 2 * layers * T^2 * heads * head_dim (QK^T and AV, 2 * T^2 * d each
  over full attention, halved by the causal mask) + 2 * hidden * vocab (the LM head, on the last position only,
  as generation prefill runs it). Norms, softmax and RoPE are left out (a few per cent at most).
- Tower and connector FLOPs: torch's FlopCounterMode over the meta-device forward of all the image's crops
  (matmuls, convolutions, attention), so every connector is counted by what it runs, not by a formula.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, PretrainedConfig

from .build import connector_dict, resolve_llm, resolve_vision, text_head_dim
from .config import VLMConfig
from .connectors import available_connectors, build_connector
from .model import assemble_images
from .policies import Layout, image_policy_config_from_dict, pool_patches
from .presets import LLM_PRESETS, TOWER_PRESETS
from .towers import build_tower, select_features, tower_spec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# A short exchange around the image: a question and a short answer, as in LLaVA's VQA-style benchmarks.
DEFAULT_TEXT_TOKENS = 128
# What --measure divides among requests: on the order of the KV memory a CPU host or a small GPU leaves free.
DEFAULT_KV_BUDGET_GIB = 1.0
# The real shapes a tiny checkpoint's policy and connector are also shown at (LLaVA-1.5's tower and LLM).
REAL_TOWER, REAL_LLM = "clip-vit-l-14-336", "llama-7b"
WARMUP = 2  # untimed runs before the timed ones (first-call allocations, oneDNN kernel selection)


def parse_image_size(value: str) -> tuple[int, int]:
    """`WxH` (e.g. 672x336) or `N`, a square N x N image -> (width, height)."""
    text = value.strip().lower()
    width, sep, height = text.partition("x")
    if not sep:
        height = width
    if not (width.isdigit() and height.isdigit()):
        raise ValueError(
            f"image size {value!r} is not WxH or N in pixels (e.g. 672x336, or 336 for a square)"
        )
    if int(width) < 1 or int(height) < 1:
        raise ValueError(f"image size {value!r}: width and height must be at least 1 px")
    return int(width), int(height)


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype].itemsize


# -- the LLM's side: KV cache and prefill FLOPs from its config ------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LLMShape:
    """The config fields the KV cache and prefill FLOPs depend on, plus the decoder's matmul parameters."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    context: int
    matmul_params: int  # weights of every Linear in the decoder layers (not the embeddings, not the LM head)

    @classmethod
    def from_config(cls, text_config: PretrainedConfig) -> LLMShape:
        with torch.device("meta"):  # counts parameters without allocating them
            decoder = AutoModelForCausalLM.from_config(text_config).get_decoder()
        matmul = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
        heads = text_config.num_attention_heads
        return cls(
            layers=text_config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=text_head_dim(text_config),
            hidden=text_config.hidden_size,
            vocab=text_config.vocab_size,
            context=int(text_config.max_position_embeddings),
            matmul_params=matmul,
        )

    def kv_bytes_per_token(self, dtype: str) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes(dtype)

    def prefill_flops(self, tokens: int) -> int:
        linear = 2 * self.matmul_params * tokens
        attention = 2 * self.layers * tokens**2 * self.heads * self.head_dim  # causal: half of QK^T + AV
        return linear + attention + 2 * self.hidden * self.vocab


# -- the image's side: crops, tokens and FLOPs from a meta-device forward --------------------------------------
@dataclasses.dataclass
class TowerPass:
    """The tower's selected features for all crops of one image (meta tensors) and the FLOPs it took."""

    layout: Layout
    features: torch.Tensor
    flops: int


def _counted(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = fn()
    return out, counter.get_total_flops()


def image_layout(config: VLMConfig, width: int, height: int) -> Layout:
    """The crops the config's policy cuts a width x height image into (the policy names a size it cannot tile)."""
    return config.policy.layout(width, height, config.image_size)


def tower_pass(config: VLMConfig, width: int, height: int) -> TowerPass:
    vision = config.vision_config
    layout = image_layout(config, width, height)
    with torch.device("meta"):
        tower = build_tower(vision).requires_grad_(False)  # the FLOP counter's module hooks need no autograd
        pixels = torch.empty(layout.n_crops, vision.num_channels, vision.image_size, vision.image_size)
        has_cls = tower_spec(vision).has_cls_token

        def run() -> torch.Tensor:
            hidden = tower(pixels, output_hidden_states=True).hidden_states
            return select_features(
                hidden, config.vision_feature_layer, config.vision_feature_select_strategy, has_cls
            )

        features, flops = _counted(run)
    return TowerPass(layout, features, flops)


def connector_pass(config: VLMConfig, tower: TowerPass, width: int, height: int) -> tuple[int, int]:
    """(tokens the assembled image takes, connector FLOPs over all crops), on the meta device."""
    with torch.device("meta"):
        connector = build_connector(
            config.connector_config,
            vision_hidden_size=config.vision_config.hidden_size,
            text_hidden_size=config.text_config.hidden_size,
            num_patches=config.connector_patches,
            image_newline=config.policy.uses_newline,
        ).requires_grad_(False)
        pooled = pool_patches(tower.features, config.image_policy_config.pool)
        crop_embeds, flops = _counted(lambda: connector(pooled))
        sizes = torch.tensor([[height, width]], device="cpu")  # the layout is read back from it, on the host
        image = assemble_images(config, crop_embeds, sizes, connector.image_newline)
    tokens = image[0].shape[0] if isinstance(image, list) else image.shape[1]
    return tokens, flops


def measured_tokens(config: VLMConfig, width: int | None = None, height: int | None = None) -> int:
    """Tokens one image takes, read off the meta-device forward (default size: one tile)."""
    width, height = width or config.image_size, height or config.image_size
    return connector_pass(config, tower_pass(config, width, height), width, height)[0]


# -- one row of the table ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BudgetRow:
    """One connector's cost for one width x height image and `text_tokens` text tokens in one request."""

    connector: str
    width: int
    height: int
    policy: str  # `single`, `anyres`, with `pool N` when pooling
    layout: str  # `base` (one crop) or `base+RxC`
    crops: int
    patches: int  # tower features per crop (after CLS selection, before pooling)
    tokens_per_crop: int
    tokens_per_image: int
    text_tokens: int
    context: int
    kv_bytes_per_token: int
    dtype: str
    tower_flops: int  # all crops
    connector_flops: int  # all crops
    llm_flops: int  # the whole prompt's prefill
    llm: LLMShape

    @property
    def tokens(self) -> int:
        return self.tokens_per_image + self.text_tokens

    @property
    def share(self) -> float:
        """Of the LLM's context, the image's share."""
        return self.tokens_per_image / self.context

    @property
    def kv_mib(self) -> float:
        return self.kv_bytes_per_token * self.tokens / 2**20

    @property
    def encoder_flops(self) -> int:
        return self.tower_flops + self.connector_flops

    @property
    def prefill_flops(self) -> int:
        return self.encoder_flops + self.llm_flops


def _policy_label(config: VLMConfig) -> str:
    pool = config.image_policy_config.pool
    return config.image_policy["type"] + (f" pool {pool}" if pool > 1 else "")


def _layout_label(layout: Layout) -> str:
    return f"base+{layout.rows}x{layout.cols}" if layout.rows else "base"


def config_row(
    config: VLMConfig,
    width: int,
    height: int,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    dtype: str = "bf16",
    context: int | None = None,
    llm: LLMShape | None = None,
    tower: TowerPass | None = None,
) -> BudgetRow:
    """The row for one assembled config; `llm` and `tower` reuse passes shared by several connectors."""
    if text_tokens < 0:
        raise ValueError(f"--text-tokens must be >= 0, got {text_tokens}")
    llm = llm or LLMShape.from_config(config.text_config)
    tower = tower or tower_pass(config, width, height)
    name = config.connector["type"]
    tokens, connector_flops = connector_pass(config, tower, width, height)
    counted = config.image_token_count(width, height)
    if tokens != counted:
        raise RuntimeError(
            f"{name}: image_token_count gives {counted} tokens for {width}x{height} but the forward produced {tokens}"
        )
    context = context or llm.context
    if tokens + text_tokens > context:
        raise ValueError(
            f"{name}: a {width}x{height} image takes {tokens} tokens ({_layout_label(tower.layout)}) and the text "
            f"{text_tokens} more, {tokens + text_tokens} in all, over the LLM's context of {context} tokens"
        )
    return BudgetRow(
        connector=name,
        width=width,
        height=height,
        policy=_policy_label(config),
        layout=_layout_label(tower.layout),
        crops=tower.layout.n_crops,
        patches=config.num_patches,
        tokens_per_crop=config.num_image_tokens,
        tokens_per_image=tokens,
        text_tokens=text_tokens,
        context=context,
        kv_bytes_per_token=llm.kv_bytes_per_token(dtype),
        dtype=dtype,
        tower_flops=tower.flops,
        connector_flops=connector_flops,
        llm_flops=llm.prefill_flops(tokens + text_tokens),
        llm=llm,
    )


def _preset_configs(
    tower: str, llm: str, tower_size: int | None
) -> tuple[PretrainedConfig, PretrainedConfig, bool]:
    if tower not in TOWER_PRESETS:
        raise ValueError(f"vlm tokens needs a tower preset ({', '.join(TOWER_PRESETS)}), got {tower!r}")
    if llm not in LLM_PRESETS:
        raise ValueError(f"vlm tokens needs an LLM preset ({', '.join(LLM_PRESETS)}), got {llm!r}")
    vision_config, _, _ = resolve_vision(tower, **({"image_size": tower_size} if tower_size else {}))
    text_config, _, _ = resolve_llm(llm)
    return vision_config, text_config, TOWER_PRESETS[tower].tiny and LLM_PRESETS[llm].tiny


def budget_rows(
    tower: str,
    llm: str,
    connectors: list[str] | None = None,
    width: int | None = None,
    height: int | None = None,
    policy: dict | None = None,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    dtype: str = "bf16",
    context: int | None = None,
    tower_size: int | None = None,
) -> list[BudgetRow]:
    """One row per connector (default: all) for presets `tower` + `llm`, an image of width x height px (default:
    one tile) under `policy` (an `image_policy` dict, default `single`). Tiny presets get the connectors' tiny
    overrides, as `vlm init` gives them. `tower_size` overrides the tower's input resolution."""
    vision_config, text_config, tiny = _preset_configs(tower, llm, tower_size)
    width, height = width or vision_config.image_size, height or vision_config.image_size
    policy = image_policy_config_from_dict(policy).to_dict()
    shape = LLMShape.from_config(text_config)
    rows, shared_tower = [], None
    for name in connectors or available_connectors():
        config = VLMConfig(
            vision_config=vision_config,
            text_config=text_config,
            connector=connector_dict(name, tiny, {}),
            image_policy=policy,
        )
        shared_tower = shared_tower or tower_pass(config, width, height)  # the same for every connector
        rows.append(config_row(config, width, height, text_tokens, dtype, context, shape, shared_tower))
    return rows


def real_shape_row(
    config: VLMConfig, width: int, height: int, text_tokens: int, dtype: str, tower: str = REAL_TOWER
) -> tuple[BudgetRow, tuple[int, int]]:
    """The checkpoint's policy and connector type at real shapes (REAL_TOWER + REAL_LLM, the connector's own
    defaults), on the image scaled by the tile ratio so the policy picks the same grid; and that scaled size."""
    scale = TOWER_PRESETS[tower].params["image_size"] / config.image_size
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    connector = config.connector["type"]
    row = budget_rows(tower, REAL_LLM, [connector], *size, config.image_policy, text_tokens, dtype)[0]
    return row, size


# -- the table --------------------------------------------------------------------------------------------------
def si(value: float) -> str:
    """3 significant digits and an SI prefix: 41.2T, 116M."""
    for prefix, factor in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= factor:
            return f"{value / factor:.3g}{prefix}"
    return f"{value:.3g}"


def mib(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def per_token(nbytes: int) -> str:
    return f"{nbytes / 2**20:.4g} MiB" if nbytes >= 100 * 2**10 else f"{nbytes / 2**10:.4g} KiB"


COLUMNS = (  # header, width, cell
    ("connector", -10, lambda r: r.connector),
    ("layout", -9, lambda r: r.layout),
    ("crops", 5, lambda r: str(r.crops)),
    ("tok/crop", 8, lambda r: str(r.tokens_per_crop)),
    ("tokens/image", 12, lambda r: f"{r.tokens_per_image:,}"),
    ("share", 6, lambda r: f"{r.share:.1%}"),
    ("KV MiB/req", 10, lambda r: mib(r.kv_mib)),
    ("enc FLOPs", 9, lambda r: si(r.encoder_flops)),
    ("LLM FLOPs", 9, lambda r: si(r.llm_flops)),
    ("prefill", 7, lambda r: si(r.prefill_flops)),
)


def _cells(values: list[str], widths: list[int]) -> str:
    return " ".join(
        f"{v:<{-w}}" if w < 0 else f"{v:>{w}}" for v, w in zip(values, widths, strict=True)
    ).rstrip()


def format_rows(rows: list[BudgetRow], extra: tuple = ()) -> list[str]:
    columns = COLUMNS + tuple(extra)
    widths = [max(abs(w), len(h)) * (1 if w > 0 else -1) for h, w, _ in columns]
    lines = [_cells([h for h, _, _ in columns], widths)]
    lines += [_cells([cell(r) for _, _, cell in columns], widths) for r in rows]
    return lines


def budget_header(title: str, row: BudgetRow) -> list[str]:
    """What the table assumes: the image, the text tokens, the KV formula, the FLOPs formula."""
    llm = row.llm
    return [
        f"{title}; image {row.width}x{row.height} px, policy {row.policy}",
        f"per request: the image + {row.text_tokens} text tokens (--text-tokens); context {row.context:,} tokens",
        f"KV cache ({row.dtype}): 2 x {llm.layers} layers x {llm.kv_heads} KV heads x {llm.head_dim} head dim x "
        f"{dtype_bytes(row.dtype)} B = {per_token(row.kv_bytes_per_token)} per token",
        f"LLM FLOPs: 2 x {si(llm.matmul_params)} matmul params x T + 2 x {llm.layers} layers x T^2 x "
        f"{llm.heads * llm.head_dim} (causal attention) + the LM head on the last token, T = image + text tokens",
        "enc FLOPs: tower + connector over all crops, counted on the meta-device forward",
    ]


def format_budget(rows: list[BudgetRow], title: str, extra: tuple = ()) -> str:
    return "\n".join(budget_header(title, rows[0]) + format_rows(rows, extra))


# -- measured on this machine ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Measurement:
    """One request of the checkpoint at width x height, timed here (median of `repeats` after `warmup`)."""

    checkpoint: str
    width: int
    height: int
    row: BudgetRow  # the static columns, for the checkpoint's own config and this request's text tokens
    prompt_tokens: int  # the request's length: image placeholders + text, as the processor made it
    encoder_ms: float  # tower + connector (+ newline assembly) over all crops
    prefill_ms: float  # the LLM's forward over the whole prompt, image embeddings merged in; encoder excluded
    kv_budget_gib: float
    requests_in_budget: int  # floor(budget / KV per request)
    threads: int
    repeats: int
    warmup: int

    @property
    def visual_tokens(self) -> int:
        return self.row.tokens_per_image

    @property
    def kv_mib(self) -> float:
        """KV cache of this request (image + its text), in --dtype."""
        return self.row.kv_mib


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _chat(processor, words: int) -> str:
    question = " ".join(["describe"] + ["the"] * words)  # common words: about one token each
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)


def _text_tokens(processor, prompt: str) -> int:
    ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return sum(1 for i in ids if i != processor.image_token_id)


def request_prompt(processor, text_tokens: int) -> str:
    """A chat prompt with one image whose text (template included) is `text_tokens` tokens long where the template
    allows: the longest filler question not over it (the template alone, when it is already longer)."""
    words = max(0, text_tokens - _text_tokens(processor, _chat(processor, 0)))
    while words and _text_tokens(processor, _chat(processor, words)) > text_tokens:
        words -= 1
    while _text_tokens(processor, _chat(processor, words + 1)) <= text_tokens:
        words += 1
    return _chat(processor, words)


def _cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def _test_image(width: int, height: int):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def measure(
    checkpoint: str | Path,
    width: int | None = None,
    height: int | None = None,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
    dtype: str = "bf16",
    kv_budget_gib: float = DEFAULT_KV_BUDGET_GIB,
    repeats: int = 5,
    warmup: int = WARMUP,
    threads: int | None = None,
) -> Measurement:
    """Load `checkpoint` (AutoModelForImageTextToText / AutoProcessor, in `dtype`), make one request with a
    width x height image (default: one tile) and about `text_tokens` text tokens, and time its encoder and prefill
    here under the checkpoint's own image policy, on `threads` torch threads (default: torch's current count)."""
    if kv_budget_gib <= 0:
        raise ValueError(f"--kv-budget-gib must be positive, got {kv_budget_gib}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _measure(Path(checkpoint), width, height, text_tokens, dtype, kv_budget_gib, repeats, warmup)
    finally:
        torch.set_num_threads(before)  # the caller's setting, whatever was timed


def _measure(
    checkpoint: Path,
    width: int | None,
    height: int | None,
    text_tokens: int,
    dtype: str,
    kv_budget_gib: float,
    repeats: int,
    warmup: int,
) -> Measurement:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = VLMConfig.from_pretrained(str(checkpoint))
    width, height = width or config.image_size, height or config.image_size
    image_layout(config, width, height)  # a size the checkpoint's policy cannot tile, named before loading
    model = AutoModelForImageTextToText.from_pretrained(str(checkpoint), dtype=DTYPES[dtype]).eval()
    processor = AutoProcessor.from_pretrained(str(checkpoint))
    inputs = processor(
        text=request_prompt(processor, text_tokens), images=[_test_image(width, height)], return_tensors="pt"
    )
    ids, pixels, sizes = (
        inputs["input_ids"],
        inputs["pixel_values"].to(model.dtype),
        inputs.get("image_sizes"),
    )
    visual = int((ids == config.image_token_index).sum())
    row = config_row(model.config, width, height, ids.shape[1] - visual, dtype)
    with torch.inference_mode():
        encoder_ms = _median_ms(lambda: model.get_image_features(pixels, sizes), repeats, warmup)
        embeds = model.merge_image_embeds(
            ids, model.get_input_embeddings()(ids), model.get_image_features(pixels, sizes)
        )

        def prefill():
            return model.language_model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

        cache_bytes = _cache_bytes(prefill().past_key_values)
        prefill_ms = _median_ms(prefill, repeats, warmup)
    if cache_bytes != row.kv_bytes_per_token * ids.shape[1]:  # the formula against the cache prefill filled
        raise RuntimeError(
            f"the KV formula gives {row.kv_bytes_per_token * ids.shape[1]} bytes for {ids.shape[1]} tokens but the "
            f"cache holds {cache_bytes}"
        )
    budget = int(kv_budget_gib * 2**30)
    return Measurement(
        checkpoint=str(checkpoint),
        width=width,
        height=height,
        row=row,
        prompt_tokens=int(ids.shape[1]),
        encoder_ms=encoder_ms,
        prefill_ms=prefill_ms,
        kv_budget_gib=kv_budget_gib,
        requests_in_budget=budget // (row.kv_bytes_per_token * row.tokens),
        threads=torch.get_num_threads(),
        repeats=repeats,
        warmup=warmup,
    )


def measured_columns(m: Measurement) -> tuple:
    fit = f"fit {m.kv_budget_gib:g} GiB"
    return (
        ("encoder ms", 10, lambda r: f"{m.encoder_ms:.3g}"),
        ("prefill ms", 10, lambda r: f"{m.prefill_ms:.3g}"),
        (fit, len(fit), lambda r: f"{m.requests_in_budget:,}"),
    )


def policy_conflict(requested: dict | None, checkpoint: dict) -> str | None:
    """A note when the policy asked for is not the checkpoint's (which is what gets measured)."""
    if requested is None:
        return None
    wanted = image_policy_config_from_dict(requested).to_dict()
    if wanted == checkpoint:
        return None
    return f"the checkpoint's image_policy is {checkpoint}, not the requested {wanted}; measuring the checkpoint's"


__all__ = [
    "BudgetRow",
    "LLMShape",
    "Measurement",
    "budget_rows",
    "config_row",
    "format_budget",
    "measure",
    "measured_tokens",
    "parse_image_size",
    "real_shape_row",
    "available_connectors",
]

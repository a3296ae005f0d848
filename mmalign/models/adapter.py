"""How mmalign takes a Hugging Face model apart: :class:`ModelAdapter` (``adapter_for(model)``).

The decoder (the module that maps embeddings to the last hidden state), the LM head and its logit transform,
the image token, the processor's per-token inputs continued past the prompt, and :meth:`ModelAdapter.capture`:
the model's own forward run on a batch of rows up to its decoder, whose inputs are kept as a
:class:`~mmalign.models.layout.DecoderCall` for the pipelines to lay out and run (:meth:`ModelAdapter.run`).
What a family passes its decoder besides the merged embeddings is accepted only where its entry in
:data:`~mmalign.models.families.FAMILIES` says how to lay it out; anything else is refused, naming the input.
"""
from __future__ import annotations

import contextlib
import inspect
import weakref

import torch

from . import logits as L
from .families import GENERIC, REPEAT, Family, family
from .layout import DecoderCall

# decoder keyword arguments that carry no information mmalign must keep (flags, an empty cache, the logits count)
_FLAGS = {"use_cache", "return_dict", "output_attentions", "output_hidden_states", "logits_to_keep", "cache",
          "past_key_values", "cache_position"}
_ATTENTION_LAYERS = {"full_attention", "sliding_attention"}
# the children of a VLM's inner model (model.model) by role, by name: the vision encoder, and what maps its
# features into the LLM's embedding space (MLPs, mergers, pooling, Ovis2's visual embedding table)
VISION = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder")
PROJECTOR = ("multi_modal_projector", "connector", "mm_projector", "visual_embeddings_table", "projector", "merger",
             "aligner", "resampler")


class UnsupportedModel(ValueError):
    """A model (or one of its inputs) that a pipeline cannot run exactly; the message names the reason."""


class _Captured(Exception):
    pass


_ADAPTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def base_model(model):
    """The Hugging Face model under a PEFT wrapper (its LoRA layers are in place inside it), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def reference_adapter(peft_model):
    """The reference inside a PEFT model, as TRL takes it: the adapter named "ref" when the model has one
    (re-training an existing adapter from its initial copy), else the base model with every adapter off (and
    ``modules_to_save`` copies replaced by their originals)."""
    if "ref" not in getattr(peft_model, "peft_config", {}):
        with peft_model.disable_adapter():
            yield
        return
    previous = peft_model.active_adapter
    peft_model.set_adapter("ref")
    try:
        yield
    finally:
        peft_model.set_adapter(previous)


def adapter_for(model) -> "ModelAdapter":
    """The adapter of ``model`` (made once per model object; a PEFT model's is its base model's)."""
    model = base_model(model)
    adapter = _ADAPTERS.get(model)
    if adapter is None:
        adapter = _ADAPTERS[model] = ModelAdapter(model)
    return adapter


def find_decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the module mapping ``inputs_embeds`` to ``last_hidden_state``, the LM head)."""
    head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    decoder = None
    for name in ("language_model", "text_model"):
        decoder = decoder or getattr(inner, name, None)
    decoder = decoder or inner
    if head is None and hasattr(model, "language_model"):  # transformers < 4.52 VLM layout
        decoder, head = getattr(model.language_model, "model", None), getattr(model.language_model, "lm_head", None)
    if not isinstance(decoder, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        raise UnsupportedModel(f"{type(model).__name__}: cannot find its decoder and lm_head")
    return decoder, head


class ModelAdapter:
    """One Hugging Face causal LM or VLM as mmalign's pipelines see it (see the module docstring)."""

    def __init__(self, model):
        self.model = model
        self.model_type = getattr(model.config, "model_type", None)
        self.family: Family = family(self.model_type)
        self.known = self.family is not GENERIC
        self.decoder, self.head = find_decoder_and_head(model)
        self.transform = L.resolve(model.config, self.family.logits)
        self.image_token = _image_token(model.config)
        params = inspect.signature(self.decoder.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def __repr__(self) -> str:
        return f"ModelAdapter({self.model_type!r}, {type(self.model).__name__})"

    # ---------------------------------------------------------------------------------- structure
    @property
    def text_config(self):
        return self.decoder.config

    @property
    def attention(self) -> str | None:
        return getattr(self.text_config, "_attn_implementation", None)

    def window(self) -> int | None:
        """The sliding window of the decoder's sliding-window layers, None when it has none."""
        cfg = self.text_config
        width = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            return width if "sliding_attention" in types else None
        if getattr(cfg, "use_sliding_window", None) is False:
            return None
        return width

    def window_fits(self, length: int) -> bool:
        """Whether sequences of ``length`` tokens sit within every sliding window (then a window masks nothing)."""
        w = self.window()
        return w is None or length <= w

    def attention_only(self) -> bool:
        """Every decoder layer is attention (no convolution, recurrence or state-space layer)."""
        types = getattr(self.text_config, "layer_types", None)
        return types is None or set(types) <= _ATTENTION_LAYERS

    def shared_prompt_reason(self) -> str | None:
        """None when chosen and rejected may share one [prompt | chosen | rejected] sequence, else why not."""
        if not self.known:
            return f"model type {self.model_type!r} is not in mmalign.models.FAMILIES"
        if not self.family.shared_prompt:
            return self.family.about
        if self.attention not in ("sdpa", "eager"):
            return f"attn_implementation {self.attention!r} takes no 4D mask (sdpa or eager do)"
        return None

    def compaction_reason(self) -> str | None:
        """None when BDHS may remove hidden image tokens (exact compaction), else why not."""
        if self.family.bdhs is not None:
            return self.family.bdhs
        if not self.attention_only():
            return (f"model type {self.model_type!r} has decoder layers that are not attention "
                    f"({sorted(set(self.text_config.layer_types) - _ATTENTION_LAYERS)}): removing hidden tokens "
                    "is not the same as masking them")
        return None

    def roles(self) -> dict[str, list[str]]:
        """The model's modules by role, as dotted names: ``llm`` (the decoder and the LM head), ``vision`` (the
        image encoder) and ``projector`` (what maps its features into the LLM: LLaVA's multi_modal_projector,
        Qwen's merger inside the visual tower). A module of a VLM that fits no role raises (a table entry or a name
        in VISION / PROJECTOR says where it belongs); a text-only LM has the llm only."""
        names = {id(m): n for n, m in self.model.named_modules()}
        llm = [names[id(self.decoder)], names[id(self.head)]]
        out = {"llm": llm, "vision": [], "projector": []}
        inner = getattr(self.model, "model", None)
        if inner is None or inner is self.decoder:
            return out
        prefix = names[id(inner)]
        # parameters held by the inner model itself are multimodal glue (LLaVA-NeXT's image_newline): the projector's
        out["projector"] += [f"{prefix}.{n}" for n, _ in inner.named_parameters(recurse=False)]
        for child, module in inner.named_children():
            if module is self.decoder:
                continue
            name = names[id(module)]
            if child in VISION:
                out["vision"].append(name)
                out["projector"] += [f"{name}.{c}" for c, _ in module.named_children() if c in self.family.projector]
            elif child in PROJECTOR:
                out["projector"].append(name)
            elif any(True for _ in module.parameters()):
                raise UnsupportedModel(f"model type {self.model_type!r}: its module {name} is neither the vision "
                                       "tower, the projector nor the LLM by its name; name it in "
                                       "mmalign.models.adapter.VISION or PROJECTOR")
        return out

    # ----------------------------------------------------------------------------------- inputs
    def extend_inputs(self, inputs: dict, prompt_len: int, width: int) -> dict:
        """The processor's outputs for a prompt of ``prompt_len`` tokens, their per-token entries continued to
        ``width`` (responses and padding follow the prompt): with the family's fill value, or the last entry."""
        out = dict(inputs)
        for name, fill in self.family.token_inputs.items():
            value = out.get(name)
            if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[1] == width:
                continue
            if value.shape[1] != prompt_len:
                raise ValueError(f"{name}: expected {prompt_len} entries (one per prompt token), got "
                                 f"{tuple(value.shape)}")
            more = width - prompt_len
            tail = value[:, -1:].expand(-1, more, *value.shape[2:]) if fill == REPEAT else \
                value.new_full((value.shape[0], more, *value.shape[2:]), fill)
            out[name] = torch.cat([value, tail], 1)
        return out

    def pad_id(self) -> int:
        """A token id for padding rows: not the image token nor any other token id the config names (vision
        start/end, image boundaries), which the model's forward may look for."""
        special = set()
        for cfg in (self.model.config, self.text_config):
            for name, value in vars(cfg).items():
                if isinstance(value, int) and not isinstance(value, bool) and name.endswith(("token_id", "token_index")):
                    special.add(value)
        return next(i for i in range(len(special) + 1) if i not in special)

    # ------------------------------------------------------------------------------------ capture
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(input_ids)

    def capture(self, input_ids: torch.Tensor, image_inputs: dict | None = None,
                valid: torch.Tensor | None = None) -> DecoderCall:
        """Run the model's own forward on ``input_ids`` (B, T) with ``image_inputs`` (per-token entries already
        covering T, see :meth:`extend_inputs`) and ``valid`` (B, T) bool padding, up to its decoder: what it
        passes the decoder, as a :class:`DecoderCall`. The decoder itself does not run."""
        if valid is None:
            valid = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        seen = {}

        def grab(module, args, kwargs):
            seen["args"], seen["kwargs"] = args, kwargs
            raise _Captured

        # prepend: ahead of DeepSpeed ZeRO-3's own pre-forward hook, which would otherwise fetch the decoder for a
        # call that never runs (its parameter-fetch trace then failed in the next step's backward)
        hook = self.decoder.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
        try:
            self.model(input_ids=input_ids, attention_mask=valid.long(), **(image_inputs or {}), use_cache=False)
        except _Captured:
            pass
        finally:
            hook.remove()
        if "kwargs" not in seen:
            raise UnsupportedModel(f"{type(self.model).__name__}: its forward did not call its decoder "
                                   f"({type(self.decoder).__name__})")
        if seen["args"]:
            raise UnsupportedModel(f"{type(self.model).__name__}: its forward passes positional arguments to its "
                                   "decoder; mmalign reads keyword arguments only")
        return self._call(dict(seen["kwargs"]), input_ids, valid)

    def _call(self, kwargs: dict, input_ids: torch.Tensor, valid: torch.Tensor) -> DecoderCall:
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = self.embed(ids if ids is not None else input_ids)
        B, T = embeds.shape[:2]
        positions = self._positions(kwargs.pop("position_ids", None), valid, B, T, embeds.device)
        masks = self._masks(kwargs.pop("attention_mask", None))
        extras, rules = {}, {}
        for name, value in kwargs.items():
            if value is None or isinstance(value, bool) or name in _FLAGS:
                continue
            if name not in self.family.inputs:
                self._refuse(name, value)
            extras[name], rules[name] = value, self.family.inputs[name]
        return DecoderCall(embeds, positions, valid.to(embeds.device), masks, extras, rules)

    def _positions(self, value, valid: torch.Tensor, B: int, T: int, device) -> torch.Tensor:
        """(A, B, T) positions: those the model's forward computed (a family in the table: multimodal RoPE,
        PaliGemma's 1-based ids), the default ``arange`` where it passed none. A model type outside the table may
        only pass the default (on the valid columns)."""
        default = torch.arange(T, device=device).expand(1, B, T)
        if value is None:
            return default
        pos = value.to(device).long()
        pos = (pos if pos.dim() == 3 else pos.reshape(1, -1, T)).expand(-1, B, T)
        if self.known:
            return pos
        if pos.shape[0] == 1 and bool(((pos == default) | ~valid.to(device)).all()):
            return default
        self._refuse("position_ids", value)

    def _masks(self, value):
        if value is None or (isinstance(value, torch.Tensor) and value.dim() == 2):
            return None  # padding, which mmalign rebuilds for each layout
        if isinstance(value, dict) and all(v is None or (isinstance(v, torch.Tensor) and v.dim() == 4)
                                           for v in value.values()):
            if all(v is None for v in value.values()):
                return None
        elif not (isinstance(value, torch.Tensor) and value.dim() == 4):
            self._refuse("attention_mask", value)
        if not self.family.masks:
            self._refuse("attention_mask", value)
        return value

    def _refuse(self, name: str, value) -> None:
        what = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        if self.known:
            how = f"its entry in mmalign.models.FAMILIES does not say how to lay it out: give it masks=True (attention " \
                  f"masks of its own) or an inputs= Rule for {name}"
        else:
            how = (f"mmalign.models.FAMILIES has no entry for {self.model_type!r}: add one (an entry keeps the "
                   f"positions its forward computes; masks=True for masks of its own; an inputs= Rule for {name})")
        raise UnsupportedModel(
            f"model type {self.model_type!r} ({type(self.model).__name__}): its forward passes {name} ({what}) to "
            f"its decoder besides the merged embeddings, which mmalign would leave out when it runs the decoder on "
            f"its own layouts; {how}")

    def final_hidden(self, forward, *args, **kwargs) -> torch.Tensor:
        """The decoder's last hidden state when ``forward(*args, **kwargs)`` (the model's own forward) runs; the
        LM head does not run (the hook stops the forward once the decoder has returned)."""
        seen = {}

        def grab(module, args, output):
            seen["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state
            raise _Captured

        hook = self.decoder.register_forward_hook(grab)  # after DeepSpeed ZeRO-3's own (which releases the weights)
        try:
            forward(*args, **kwargs)
        except _Captured:
            pass
        finally:
            hook.remove()
        if "hidden" not in seen:
            raise UnsupportedModel(f"{type(self.model).__name__}: its forward did not call its decoder "
                                   f"({type(self.decoder).__name__})")
        return seen["hidden"]

    # ---------------------------------------------------------------------------------------- run
    def run(self, call: DecoderCall, *, cache=None, use_cache: bool = False):
        """The decoder on ``call``'s inputs (with ``cache``); its output (``last_hidden_state``, the cache)."""
        kwargs = call.kwargs()
        if cache is not None or use_cache:
            kwargs[self.cache_arg] = cache
        return self.decoder(**kwargs, use_cache=use_cache)

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor, cache):
        """One decoding step of new (text) tokens: ``input_ids`` (B, 1), ``positions`` (A, B, 1) as in the prefill's
        :class:`DecoderCall` (a text token has the same position on every M-RoPE axis), ``padding`` (B, K) over
        the cache and the new tokens."""
        pos = positions[0] if positions.shape[0] == 1 else positions
        return self.decoder(input_ids=input_ids, attention_mask=padding, position_ids=pos,
                            **{self.cache_arg: cache}, use_cache=True)

    @staticmethod
    def cache_of(output):
        cache = getattr(output, "cache", None)
        return cache if cache is not None else getattr(output, "past_key_values", None)

    # ------------------------------------------------------------------------------------- logits
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from final hidden states: its LM head, then its family's transform."""
        return self.transform(self.head(hidden))


def _image_token(config) -> int | None:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None

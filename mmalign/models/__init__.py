"""The one layer that knows how to take a Hugging Face model apart (decoder, LM head and its logit transform,
image token, what the decoder needs besides the merged embeddings, chat templates and processors).

    adapter = adapter_for(model)                     # ModelAdapter: one table entry per family (FAMILIES)
    call = adapter.capture(ids, image_inputs, valid)  # what the model's own forward hands its decoder
    hidden = adapter.run(call.select(rows, columns)).last_hidden_state

The trainer, the reference pass, the BDHS engine, evaluation and the Hugging Face / TRL integrations all go
through it (docs/models.md has the families and which paths each one runs)."""
from .adapter import (ModelAdapter, UnsupportedModel, adapter_for, base_model, find_decoder_and_head,  # noqa: F401
                      reference_adapter)
from .families import FAMILIES, GENERIC, Family  # noqa: F401
from .layout import DecoderCall, Rule  # noqa: F401
from .logits import LogitTransform  # noqa: F401
from .prompts import EncodedPrompt, PromptEncoder, load_model  # noqa: F401


def logit_transform(model) -> LogitTransform:
    """The transform ``model``'s forward applies to its LM head's output (identity for most families); raises
    ValueError for a model type whose config announces one its family entry does not name."""
    from .families import family
    from .logits import resolve

    return resolve(model.config, family(getattr(model.config, "model_type", None)).logits)

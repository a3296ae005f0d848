"""BDHS engine vs the straightforward implementation, same model, data and draws, greedy, one try:

  engine        mmalign.bdhs.BDHSEngine: one compacted prefill per pair (hidden image tokens removed),
                all sentences of all pairs decoded together from their cache prefixes
  per-sentence  mmalign.bdhs.baseline.sentence_by_sentence: Hugging Face generate() per sentence over its
                full prefix, image keys hidden by attn_implementation="mmalign_masked"

Before timing, the two are checked to produce identical tokens (asserted in fp32; in bf16 the share of
identical sentences is recorded as `identical_sentences`, since the two paths round differently). Time is per batch of pairs (pairs/s =
pairs / time; `pairs` is in extra_info). The model is a LLaVA built from a config with random weights
(no downloads): CPU: 576 image tokens (LLaVA-1.5's 336 px / 14), a 4-layer 256-wide decoder, 4 pairs of 4
sentences, 12 new tokens per sentence, fp32. GPU: the same image tokens, a 16-layer 2048-wide decoder
(~1B), 8 pairs, 32 new tokens, bf16. ρ_th = 0.99."""
import pytest
import torch

from mmalign.attention import hf
from mmalign.bdhs import BDHSConfig, BDHSEngine, PairInput
from mmalign.bdhs.baseline import sentence_by_sentence

from conftest import run_case

CHOSEN = ("The image shows a {c} {s} on a white background. The {s} is in the centre of the picture. "
          "There is nothing else in the image. Yes, the colours are bright and the edges are sharp.")
COLOURS, SHAPES = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle", "star")
_cache = {}


def _setup(device, quick):
    key = (device, quick)
    if key in _cache:
        return _cache[key]
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

    hf.register()
    words = CHOSEN + " " + " ".join(COLOURS + SHAPES) + " USER ASSISTANT : Describe the image ."
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>", "<image>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    gpu = device == "cuda"
    text = dict(vocab_size=len(tok), hidden_size=2048 if gpu else 256, intermediate_size=5632 if gpu else 688,
                num_hidden_layers=16 if gpu else 4, num_attention_heads=32 if gpu else 8,
                num_key_value_heads=8 if gpu else 2, max_position_embeddings=4096, pad_token_id=0, eos_token_id=2)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=336,
                  patch_size=14)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=3, vision_feature_layer=-1)
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").to(device, dtype).eval()
    masked = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="mmalign_masked").to(device, dtype).eval()
    masked.load_state_dict(model.state_dict())
    n_pairs = 8 if gpu else (2 if quick else 4)
    g = torch.Generator().manual_seed(0)
    prompt = [tok.convert_tokens_to_ids(t) for t in ("USER", ":")] + [3] * 576 + \
        tok("Describe the image . ASSISTANT :", add_special_tokens=False)["input_ids"]
    pairs = [PairInput(f"pair-{i}", torch.tensor(prompt), CHOSEN.format(c=COLOURS[i % 4], s=SHAPES[i % 4]),
                       {"pixel_values": torch.randn(1, 3, 336, 336, generator=g).to(device, dtype)})
             for i in range(n_pairs)]
    engine = BDHSEngine(model, tok, lambda a, b: torch.zeros(len(a)),
                        BDHSConfig(mode="attn", rho_th=0.99, tries=1, max_new_tokens=32 if gpu else 12))
    rows = engine.complete_rows(pairs, 1)
    same = total = 0
    for j, pair in enumerate(pairs):  # identical greedy tokens, or the comparison means nothing
        alone = sentence_by_sentence(engine, masked, pair, 1)
        for m, a in zip([r.generated for r in rows if r.pair == j], alone):
            same, total = same + (m == a[:len(m)]), total + 1
    if dtype == torch.float32:  # in bf16, compaction + flash and the masked kernel round differently
        assert same == total, f"engine and baseline differ in {total - same} of {total} sentences"
    _cache[key] = (engine, masked, pairs, dtype, same / total)
    return _cache[key]


@pytest.mark.parametrize("provider", ["engine", "per-sentence"])
def test_bdhs(benchmark, device, quick, provider):
    engine, masked, pairs, dtype, identical = _setup(device, quick)
    if provider == "engine":
        fn = lambda: engine.complete_rows(pairs, 1)  # noqa: E731
    else:
        fn = lambda: [sentence_by_sentence(engine, masked, p, 1) for p in pairs]  # noqa: E731
    benchmark.group = f"bdhs greedy rho_th=0.99 pairs={len(pairs)}"
    run_case(benchmark, device, fn, lambda: (), op="bdhs", mode="one try", provider=provider,
             shape=f"pairs={len(pairs)} image_tokens=576 {str(dtype).replace('torch.', '')}", pairs=len(pairs),
             identical_sentences=identical, rounds=3 if device == "cuda" else 2)

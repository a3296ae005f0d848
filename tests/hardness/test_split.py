"""The rules splitter on tricky text, and the LLM splitter's parsing and fallback."""
import pytest
import torch

from mmalign.hardness.split import LLMSplitter, RulesSplitter, parse_statements, split_rules

from ._fixtures import word_tokenizer


@pytest.mark.parametrize("text, expected", [
    ("A red circle. A blue square!", ["A red circle.", "A blue square!"]),
    ("Dr. Smith weighs 72.5 kg. He is tall.", ["Dr. Smith weighs 72.5 kg.", "He is tall."]),
    ("The U.S. flag has 50 stars, e.g. on the left.", ["The U.S. flag has 50 stars, e.g. on the left."]),
    ("The cat is black, and the dog is white.", ["The cat is black", "the dog is white."]),
    ("There is a car, which is red; it is parked.", ["There is a car", "which is red", "it is parked."]),
    ("A man, a woman and a child stand in a row.", ["A man, a woman and a child stand in a row."]),
    ("J. R. R. Tolkien wrote it. Version 3.5 is out.", ["J. R. R. Tolkien wrote it.", "Version 3.5 is out."]),
    ("1. A bowl of soup.\n2. A spoon.\n- A napkin", ["A bowl of soup.", "A spoon.", "A napkin"]),
    ("It is approx. three metres tall. \"Wow.\" She said.", ["It is approx. three metres tall.", "\"Wow.\"",
                                                             "She said."]),
    ("", []), ("   \n  ", []), ("...", []), ("; , .", []),
])
def test_rules_splitter(text, expected):
    assert split_rules(text) == expected


def test_rules_pieces_are_never_empty(rng):
    alphabet = list("ab .,;!?\n") + [", and ", ", which ", "Dr. ", "3.5"]
    for _ in range(300):
        idx = torch.randint(0, len(alphabet), (30,), generator=rng).tolist()
        for piece in split_rules("".join(alphabet[i] for i in idx)):
            assert piece == piece.strip() and any(ch.isalnum() for ch in piece)


@pytest.mark.parametrize("generated, expected", [
    ("- A dog.\n- A cat.\n\nText: more", ["A dog.", "A cat."]),
    ("\n- One statement.\nText: the next example", ["One statement."]),
    ("A dog. A cat.", None), ("", None), ("- \n- A cat.", None),
])
def test_parse_statements(generated, expected):
    assert parse_statements(generated) == expected


class _Scripted(LLMSplitter):
    """An LLMSplitter whose generations are given: tests the parsing and fallback bookkeeping."""

    def __init__(self, outputs):
        self.outputs, self.batch_size = list(outputs), 2

    def generate(self, texts):
        return [self.outputs.pop(0) for _ in texts]


def test_llm_splitter_uses_parsed_output_and_falls_back_to_rules():
    splitter = _Scripted(["- The dog is brown.\n- The dog sits.\n\nText:", "garbage without bullets", "- x"])
    got = splitter.split_many(["The dog is brown and sits.", "A cat, and a hat.", "X."])
    assert got[0].pieces == ["The dog is brown.", "The dog sits."] and not got[0].fallback
    assert got[1].pieces == ["A cat", "a hat."] and got[1].fallback
    assert got[2].pieces == ["x"] and not got[2].fallback


def test_llm_splitter_with_a_tiny_random_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmalign.hardness.split import FEW_SHOT

    tok = word_tokenizer([FEW_SHOT, "a red circle the dog is brown - ."], bos="<s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    splitter = LLMSplitter(model, tok, batch_size=2, max_new_tokens=6)
    got = splitter.split_many(["The dog is brown. It sits.", "A red circle", ""])
    assert len(got) == 3 and got[2].pieces == []
    for split, text in zip(got[:2], ["The dog is brown. It sits.", "A red circle"]):
        # a random model writes no "- " lines: the rules take over, and the fallback is recorded
        assert split.fallback and split.pieces == split_rules(text)


def test_llm_splitter_checks_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        LLMSplitter(torch.nn.Linear(1, 1), None, batch_size=0)
    assert RulesSplitter().split_many(["Cats sit. Dogs run."])[0].pieces == ["Cats sit.", "Dogs run."]


def test_llm_splitter_asks_an_instruct_model_through_its_chat_template():
    """An LLM with a chat template (LLaMA-3-Instruct, as DAMO prompts) gets the few-shot prompt as the user's turn of
    that template, ready for the assistant's answer; a base LM gets it raw."""
    from mmalign.hardness.split import FEW_SHOT

    tok = word_tokenizer([FEW_SHOT, "a red circle the dog is brown - . USER ASSISTANT :"], bos="<s>")
    seen = []

    class Model(torch.nn.Module):
        device = torch.device("cpu")

        def generate(self, input_ids, **kw):
            seen.append(tok.decode(input_ids[0]))
            return torch.cat([input_ids, input_ids[:, :1]], 1)

    LLMSplitter(Model(), tok).split_many(["A red circle"])
    tok.chat_template = "{% for m in messages %}USER : {{ m['content'] }}{% endfor %} ASSISTANT :"
    LLMSplitter(Model(), tok).split_many(["A red circle"])
    raw, chat = seen
    assert raw.startswith("Rewrite the text") and "USER" not in raw  # the few-shot prompt as is
    assert chat.startswith("USER :") and chat.endswith("ASSISTANT :") and "Text : A red circle" in chat

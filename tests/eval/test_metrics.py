"""POPE, CHAIR and AMBER metrics against hand-computed values.

Every expected value below was worked out by hand from the sample (the working is in the comments) and is
written as a literal fraction: the metrics divide integer counts once, so ``==`` holds exactly."""
import pytest

from mmalign.eval.coco import COCO_CATEGORIES, COCO_PHRASES, COCO_SYNONYMS
from mmalign.eval.metrics import (AmberVocabulary, ChairVocabulary, Mention, amber_discriminative_scores,
                                  amber_generative_scores, chair_scores, grouped_pope_scores, macro_average,
                                  parse_yes_no, plural_forms, pope_scores, pope_scores_by_setting, singular_map,
                                  tokenize)

# ------------------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"), ("No.", "no"),
    ("Yes, there is a dog in the image.", "yes"),
    ("There is not a dog", "no"),
    ("I don't know", "yes"),                     # no negation word: POPE reads it as yes
    ("no, but there is a cat", "no"),            # the comma is dropped, "no" is a word
    ("", "yes"), ("   ", "yes"),                 # empty answers read as yes, like the release
    ("Yes. There is no dog.", "yes"),            # only the text before the first '.' counts
    ("There is no dog. Yes.", "no"),
    ("NO", "yes"), ("Not at all", "yes"),        # case-sensitive: only No / not / no
    ("No!", "yes"), ("Nope", "yes"),             # punctuation other than ',' and '.' stays on the word
    ("no\nthere is none", "yes"),                # split on spaces only: "no\nthere" is one word
    ("no,yes", "yes"),                           # comma removed: "noyes"
    ("No, there is not.", "no"),
    ("yes", "yes"), ("no", "no"),                # already parsed answers stay as they are
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_parse_yes_no_needs_text():
    with pytest.raises(TypeError):
        parse_yes_no(None)


LABELS = ["yes", "yes", "yes", "yes", "yes", "no", "no", "no", "no", "no"]
ANSWERS = ["Yes", "Yes, there is.", "yes", "No", "Yes",       # yes-labels: read yes, yes, yes, no, yes
           "Yes", "No.", "no", "There is not a cat.", "I don't know"]  # no-labels: read yes, no, no, no, yes


def test_pope_scores_yes_positive():
    # tp = 4 (yes-labels read yes), fn = 1, fp = 2 (answers 5 and 9), tn = 3
    s = pope_scores(LABELS, ANSWERS)
    assert (s["tp"], s["fp"], s["tn"], s["fn"], s["n"]) == (4, 2, 3, 1, 10)
    assert s["accuracy"] == 7 / 10
    assert s["precision"] == 4 / 6
    assert s["recall"] == 4 / 5
    assert s["f1"] == 8 / 11          # 2PR/(P+R) = (16/15)/(22/15)
    assert s["yes_ratio"] == 6 / 10
    assert s["positive"] == "yes"


def test_pope_scores_no_positive():
    # the same answers with "no" as positive: tp = 3, fp = 1, tn = 4, fn = 2
    s = pope_scores(LABELS, ANSWERS, positive="no")
    assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (3, 1, 4, 2)
    assert s["accuracy"] == 7 / 10
    assert s["precision"] == 3 / 4
    assert s["recall"] == 3 / 5
    assert s["f1"] == 2 / 3            # 2*3 / (2*3 + 1 + 2)
    assert s["yes_ratio"] == 6 / 10    # the share of "yes" answers whatever the positive class


def test_pope_scores_zero_denominators():
    s = pope_scores(["no", "no"], ["No", "There is not."])
    assert (s["tp"], s["fp"], s["tn"], s["fn"]) == (0, 0, 2, 0)
    assert (s["accuracy"], s["precision"], s["recall"], s["f1"], s["yes_ratio"]) == (1.0, 0.0, 0.0, 0.0, 0.0)


def test_pope_scores_labels_any_case():
    assert pope_scores(["Yes", " NO "], ["yes", "no"])["accuracy"] == 1.0


@pytest.mark.parametrize("labels, answers, kwargs, match", [
    (["yes"], ["Yes", "No"], {}, "1 labels but 2 answers"),
    ([], [], {}, "no answers"),
    (["maybe"], ["Yes"], {}, "sample 0: a label must be 'yes' or 'no'"),
    (["yes"], ["Yes"], {"positive": "true"}, "positive must be"),
])
def test_pope_scores_errors(labels, answers, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pope_scores(labels, answers, **kwargs)


def test_pope_scores_by_setting_and_average():
    settings = ["adversarial", "random", "popular", "random", "popular", "adversarial"]
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    answers = ["yes", "Yes", "No", "Yes", "No", "no"]
    per = pope_scores_by_setting(settings, labels, answers)
    assert list(per) == ["random", "popular", "adversarial"]
    # random: tp 1, fp 1 -> acc 1/2, P 1/2, R 1, F1 2/3, yes 1
    r = per["random"]
    assert (r["accuracy"], r["precision"], r["recall"], r["f1"], r["yes_ratio"]) == (1 / 2, 1 / 2, 1.0, 2 / 3, 1.0)
    # popular: fn 1, tn 1 -> acc 1/2, P 0, R 0, F1 0, yes 0
    p = per["popular"]
    assert (p["accuracy"], p["precision"], p["recall"], p["f1"], p["yes_ratio"]) == (1 / 2, 0.0, 0.0, 0.0, 0.0)
    # adversarial: tp 1, tn 1 -> all 1, yes 1/2
    a = per["adversarial"]
    assert (a["accuracy"], a["precision"], a["recall"], a["f1"], a["yes_ratio"]) == (1.0, 1.0, 1.0, 1.0, 1 / 2)
    avg = macro_average(per)
    assert avg == pytest.approx({"accuracy": 2 / 3, "precision": 1 / 2, "recall": 2 / 3, "f1": 5 / 9,
                                 "yes_ratio": 1 / 2})


def test_grouped_pope_scores_keeps_first_appearance_order_and_checks_lengths():
    per = grouped_pope_scores(["b", "a", "b"], ["yes", "no", "no"], ["yes", "no", "yes"])
    assert list(per) == ["b", "a"] and per["b"]["n"] == 2 and per["a"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="2 groups"):
        grouped_pope_scores(["a", "b"], ["yes"], ["yes"])
    with pytest.raises(ValueError, match="no groups"):
        macro_average({})


# ----------------------------------------------------------------------------------- words, plurals


@pytest.mark.parametrize("word, plurals", [
    ("dog", ("dogs",)), ("bus", ("buses", "busses")), ("bench", ("benches",)), ("box", ("boxes",)),
    ("puppy", ("puppies",)), ("turkey", ("turkeys",)), ("woman", ("women",)), ("policeman", ("policemen",)),
    ("grandchild", ("grandchildren",)), ("person", ("people", "persons")), ("knife", ("knives",)),
    ("calf", ("calves",)), ("giraffe", ("giraffes",)), ("sheep", ()), ("potato", ("potatos", "potatoes")),
    ("hot dog", ("hot dogs",)), ("wine glass", ("wine glasses",)),
])
def test_plural_forms(word, plurals):
    assert plural_forms(word) == plurals


def test_singular_map_keeps_words_that_are_in_the_vocabulary():
    assert singular_map(["person", "people", "dog", "skis", "ski"]) == {"persons": "person", "dogs": "dog"}


def test_tokenize():
    assert tokenize("The dog's hot-dog, and 2 T-shirts!") == ["the", "dog", "s", "hot-dog", "and", "2", "t-shirts"]


# ------------------------------------------------------------------------------------------ CHAIR


def test_coco_vocabulary_data():
    assert len(COCO_CATEGORIES) == 80 and len(set(COCO_CATEGORIES)) == 80
    assert tuple(COCO_SYNONYMS) == COCO_CATEGORIES
    vocab = ChairVocabulary.coco()
    assert vocab.categories == COCO_CATEGORIES
    assert vocab.category_of("Man") == "person" and vocab.category_of("teddybear") == "teddy bear"
    assert vocab.category_of("iPhone") == "cell phone" and vocab.category_of("plate") is None
    assert COCO_PHRASES["baby dog"] == "dog" and COCO_PHRASES["toilet seat"] == "toilet"


@pytest.mark.parametrize("text, expected", [
    ("A man and a woman walk their dogs.", ["person", "dog"]),        # synonyms, plural, once each
    ("Two people eat hot dogs.", ["person", "hot dog"]),              # "hot dog" is never a dog
    ("A teddy bear.", ["teddy bear"]),                                # ... nor "teddy bear" a bear
    ("A teddy bear next to a bear.", ["teddy bear", "bear"]),
    ("A baby elephant.", ["elephant"]), ("A baby.", ["person"]),      # qualifiers do not fire "person"
    ("Adult birds and a passenger jet.", ["bird", "airplane"]),
    ("A toilet seat.", ["toilet"]), ("A toilet and a seat.", ["toilet"]), ("A seat.", ["chair"]),
    ("Motor bikes, a bow tie and sports balls.", ["motorcycle", "tie", "sports ball"]),
    ("Wine glasses on dining tables.", ["wine glass", "dining table"]),
    ("Glasses.", []),                                                  # "glass" alone is not a category
    ("Children and puppies, mice and oxen, geese.", ["person", "dog", "mouse", "cow", "bird"]),
    ("Knives, forks and a ski; skis.", ["knife", "fork", "skis"]),
    ("A hot-dog stand.", []),                                          # a hyphenated word stays one word
    ("The dog's bowl.", ["dog", "bowl"]),
    ("An orange cat.", ["orange", "cat"]),                             # CHAIR's own noise, kept
    ("The pitcher stands on home plate.", ["person"]),
    ("A stove top oven.", ["oven"]),
    ("", []),
])
def test_chair_mentions(text, expected):
    assert ChairVocabulary.coco().mentions(text) == expected


def test_chair_mention_occurrences():
    assert ChairVocabulary.coco().mention_occurrences("A man, a boy and hot dogs; a dog.") == [
        Mention("man", "person"), Mention("boy", "person"), Mention("hot dog", "hot dog"), Mention("dog", "dog")]


def test_chair_vocabulary_rejects_ambiguous_synonyms():
    with pytest.raises(ValueError, match="'pup' is a synonym of both"):
        ChairVocabulary({"dog": ["pup"], "seal": ["pup"]})


CHAIR_SAMPLES = [
    # mentions person, horse, dog; dog hallucinated; 9 words
    {"id": "a", "text": "A man rides a horse next to a dog.", "ground_truth": {"person", "horse"}},
    # mentions person, hot dog, dining table, teddy bear; teddy bear hallucinated; cup not mentioned; 13 words
    {"id": "b", "text": "Two people eat hot dogs at a dining table with a teddy bear.",
     "ground_truth": {"person", "hot dog", "dining table", "cup"}},
    # mentions cat (twice), couch; nothing hallucinated; remote not mentioned; 10 words
    {"id": "c", "text": "A cat sleeps on a couch. The cat is black.", "ground_truth": {"cat", "couch", "remote"}},
]


def test_chair_scores_unique_per_text():
    s = chair_scores(CHAIR_SAMPLES)
    # mentions 3 + 4 + 2 = 9, hallucinated 1 + 1 + 0 = 2
    assert (s["n"], s["mentions"], s["hallucinated_mentions"], s["hallucinated_texts"]) == (3, 9, 2, 2)
    assert s["chair_i"] == 2 / 9
    assert s["chair_s"] == 2 / 3
    # covered 2 + 3 + 2 = 7 of 2 + 4 + 3 = 9 ground-truth objects
    assert (s["covered_objects"], s["ground_truth_objects"]) == (7, 9)
    assert s["recall"] == 7 / 9
    assert s["mean_length"] == 32 / 3  # (9 + 13 + 10) / 3
    a, b, c = s["samples"]
    assert a == {"id": "a", "mentioned": ["person", "horse", "dog"], "hallucinated": ["dog"],
                 "covered": ["person", "horse"], "ground_truth": ["horse", "person"], "n_words": 9,
                 "n_mentions": 3, "n_hallucinated": 1, "chair_i": 1 / 3, "recall": 1.0}
    assert b["hallucinated"] == ["teddy bear"] and b["chair_i"] == 1 / 4 and b["recall"] == 3 / 4
    assert b["mentioned"] == ["person", "hot dog", "dining table", "teddy bear"]
    assert c["mentioned"] == ["cat", "couch"] and c["chair_i"] == 0.0 and c["recall"] == 2 / 3


def test_chair_scores_per_occurrence():
    # occurrences 3 + 4 + 3 (cat twice) = 10, hallucinated 2
    s = chair_scores(CHAIR_SAMPLES, unique=False)
    assert (s["mentions"], s["hallucinated_mentions"]) == (10, 2)
    assert s["chair_i"] == 1 / 5 and s["chair_s"] == 2 / 3 and s["recall"] == 7 / 9


def test_chair_scores_without_mentions_and_pairs():
    s = chair_scores([("A blurry photo.", {"person"}), ("Nothing here", set())])
    assert (s["chair_i"], s["chair_s"], s["recall"], s["mean_length"]) == (0.0, 0.0, 0.0, 5 / 2)
    assert s["samples"][0]["chair_i"] is None and s["samples"][0]["recall"] == 0.0
    assert s["samples"][1]["recall"] is None


@pytest.mark.parametrize("samples, match", [
    ([], "no texts"),
    ([{"text": "A man.", "ground_truth": {"man"}}], r"sample 0: ground-truth objects \['man'\]"),
    ([{"text": "A man."}], "needs 'text' and 'ground_truth'"),
    ([("A man.", "person")], "not a string"),
    ([42], "expected a mapping"),
])
def test_chair_scores_errors(samples, match):
    with pytest.raises(ValueError, match=match):
        chair_scores(samples)


# ---------------------------------------------------------------------------------- AMBER: yes/no

AMBER_DISC = [
    {"id": 101, "type": "discriminative-hallucination", "truth": "no"},       # "No"              -> no
    {"id": 102, "type": "discriminative-hallucination", "truth": "no"},       # "Yes, there is .." -> yes
    {"id": 103, "type": "discriminative-hallucination", "truth": "yes"},      # "Yes"             -> yes
    {"id": 104, "type": "discriminative-attribute-state", "truth": "yes"},    # "No"              -> no
    {"id": 105, "type": "discriminative-attribute-number", "truth": "no"},    # "No, there are 3." -> no
    {"id": 106, "type": "discriminative-attribute-action", "truth": "yes"},   # "Yes"             -> yes
    {"id": 107, "type": "discriminative-relation", "truth": "no"},            # "There is not .." -> no
    {"id": 108, "type": "relation", "truth": "yes"},                          # "No"              -> no
    {"id": 1, "type": "generative", "truth": ["dog"], "hallu": ["cat"]},
]
AMBER_ANSWERS = {101: "No", 102: "Yes, there is a cat.", 103: "Yes", 104: "No", 105: "No, there are 3.",
                 106: "Yes", 107: "There is not any contact.", 108: "No", 1: "A dog."}


def _core(s):
    return s["accuracy"], s["precision"], s["recall"], s["f1"], s["yes_ratio"]


def test_amber_discriminative_scores_no_positive():
    per = amber_discriminative_scores(AMBER_DISC, AMBER_ANSWERS)
    assert list(per) == ["discriminative", "existence", "attribute", "state", "number", "action", "relation"]
    # all: tp (no, no) = 101, 105, 107; fp (yes, no) = 104, 108; fn = 102; tn = 103, 106
    assert (per["discriminative"]["tp"], per["discriminative"]["fp"], per["discriminative"]["fn"],
            per["discriminative"]["tn"]) == (3, 2, 1, 2)
    assert _core(per["discriminative"]) == (5 / 8, 3 / 5, 3 / 4, 2 / 3, 3 / 8)
    assert _core(per["existence"]) == (2 / 3, 1.0, 1 / 2, 2 / 3, 2 / 3)   # tp 1, fn 1, tn 1
    assert _core(per["attribute"]) == (2 / 3, 1 / 2, 1.0, 2 / 3, 1 / 3)   # tp 1, fp 1, tn 1
    assert _core(per["state"]) == (0.0, 0.0, 0.0, 0.0, 0.0)               # fp 1
    assert _core(per["number"]) == (1.0, 1.0, 1.0, 1.0, 0.0)              # tp 1
    assert _core(per["action"]) == (1.0, 0.0, 0.0, 0.0, 1.0)              # tn 1
    assert _core(per["relation"]) == (1 / 2, 1 / 2, 1.0, 2 / 3, 0.0)      # tp 1, fp 1 ("relation" type too)
    assert per["discriminative"]["positive"] == "no"


def test_amber_discriminative_scores_yes_positive():
    s = amber_discriminative_scores(AMBER_DISC, AMBER_ANSWERS, positive="yes")["discriminative"]
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (2, 1, 2, 3)
    assert _core(s) == (5 / 8, 2 / 3, 1 / 2, 4 / 7, 3 / 8)


def test_amber_discriminative_errors():
    with pytest.raises(ValueError, match="response 999 has no annotation"):
        amber_discriminative_scores(AMBER_DISC, {999: "Yes"})
    with pytest.raises(ValueError, match="unknown AMBER type 'color'"):
        amber_discriminative_scores([{"id": 5, "type": "color", "truth": "yes"}], {5: "Yes"})
    with pytest.raises(ValueError, match="no discriminative response"):
        amber_discriminative_scores(AMBER_DISC, {1: "A dog."})
    with pytest.raises(ValueError, match="appears twice"):
        amber_discriminative_scores(AMBER_DISC + AMBER_DISC[:1], {101: "No"})


# ------------------------------------------------------------------------------- AMBER: generative

ASSOCIATION = {
    "person": ["man", "woman", "people"], "dog": [], "grass": ["ground"], "ground": ["floor"],
    "tree": ["forest"], "sky": [], "cat": [], "car": ["vehicle"], "cloud": [], "ball": [], "frisbee": [],
    "sign": [],
}
SAFE = ["sign"]
AMBER_GEN = [
    {"id": 1, "type": "generative", "truth": ["person", "dog", "grass", "ground"], "hallu": ["cat", "car", "cloud"]},
    {"id": 2, "type": "generative", "truth": ["tree", "sky"], "hallu": ["car"]},
    {"id": 3, "type": "generative", "truth": ["person"], "hallu": ["frisbee"]},
    {"id": 4, "type": "discriminative-hallucination", "truth": "no"},
]
AMBER_DESCRIPTIONS = {
    # object words: man, ball, dog, ground, sign, cloud, cat (7)
    #   man -> covers person (associated word); ball -> hallucinated, in no hallu list;
    #   dog -> covers dog; ground -> covers grass, the first match in AMBER's order (associated words of
    #   all truth objects before the objects), so the truth object "ground" stays uncovered;
    #   sign -> safe word; cloud, cat -> hallucinated, cover hallu objects cloud and cat
    1: "A man throws a ball to two dogs on the ground near a sign. Clouds and a cat.",
    # object words: tree, sky, vehicle (3); vehicle -> hallucinated, covers hallu object car
    2: "Trees under the sky, two vehicles.",
    3: "",
    4: "No",
}


def test_amber_generative_scores():
    s = amber_generative_scores(AMBER_GEN, AMBER_DESCRIPTIONS, ASSOCIATION, SAFE)
    assert (s["n"], s["nouns"], s["hallucinated_nouns"], s["hallucinated_responses"]) == (3, 10, 4, 2)
    assert s["chair"] == 2 / 5       # 4 / 10
    assert s["cover"] == 5 / 7       # (3 + 2 + 0) / (4 + 2 + 1)
    assert s["hal"] == 2 / 3
    assert s["cog"] == 3 / 5         # (2 + 1 + 0) / (3 + 1 + 1)
    one, two, three = s["samples"]
    assert one == {"id": 1, "nouns": ["man", "ball", "dog", "ground", "sign", "cloud", "cat"],
                   "hallucinated": ["ball", "cloud", "cat"], "covered": ["person", "dog", "grass"],
                   "cog": ["cat", "cloud"], "n_truth": 4, "n_hallu": 3}
    assert two["nouns"] == ["tree", "sky", "vehicle"] and two["covered"] == ["tree", "sky"] and two["cog"] == ["car"]
    assert three["nouns"] == [] and three["covered"] == [] and three["hallucinated"] == []


def test_amber_generative_duplicate_truth_counts_twice():
    ann = [{"id": 1, "type": "generative", "truth": ["ship", "ship"], "hallu": []}]
    s = amber_generative_scores(ann, {1: "Ships."}, {"ship": []})
    assert s["cover"] == 1 / 2 and s["cog"] == 0.0 and s["chair"] == 0.0


def test_amber_vocabulary_case_and_plurals():
    vocab = AmberVocabulary({"TV": [], "glass": ["wineglass"], "e-book": []})
    assert vocab.nouns("Two tvs, three glasses, a TV, wineglasses and e-books.") == [
        "TV", "glass", "TV", "wineglass", "e-book"]
    with pytest.raises(ValueError, match="single words"):
        AmberVocabulary({"hot dog": []})


def test_amber_generative_errors():
    with pytest.raises(ValueError, match="truth object 'unicorn' is not in the association list"):
        amber_generative_scores([{"id": 1, "type": "generative", "truth": ["unicorn"], "hallu": []}],
                                {1: "x"}, ASSOCIATION)
    with pytest.raises(ValueError, match="response 7 has no annotation"):
        amber_generative_scores(AMBER_GEN, {7: "x"}, ASSOCIATION)
    with pytest.raises(ValueError, match="no generative response"):
        amber_generative_scores(AMBER_GEN, {4: "No"}, ASSOCIATION)

"""Readers of the POPE, COCO and AMBER files: records, limits, and errors that name the file and record."""
import json

import pytest

from mmalign.eval.formats import (AmberAnnotation, AmberQuery, FormatError, PopeQuestion, read_amber_annotations,
                                  read_amber_association, read_amber_queries, read_amber_responses,
                                  read_amber_safe_words, read_coco_ground_truth, read_pope_answers,
                                  read_pope_questions)
from mmalign.eval.metrics import amber_generative_scores, chair_scores, pope_scores


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _json(path, data):
    path.write_text(json.dumps(data))
    return path


POPE_RECORDS = [
    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
     "label": "yes"},
    {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there an apple in the image?",
     "label": "no"},
    "",
    {"question_id": 3, "image": "COCO_val2014_000000210789.jpg", "text": "What is on the table?", "label": "No"},
]

# ------------------------------------------------------------------------------------------- POPE


def test_read_pope_questions(tmp_path):
    path = _jsonl(tmp_path / "coco_pope_adversarial.json", POPE_RECORDS)
    qs = read_pope_questions(path)
    assert qs == [
        PopeQuestion(1, "COCO_val2014_000000310196.jpg", "Is there a snowboard in the image?", "yes",
                     "adversarial", "snowboard"),
        PopeQuestion(2, "COCO_val2014_000000310196.jpg", "Is there an apple in the image?", "no",
                     "adversarial", "apple"),
        PopeQuestion(3, "COCO_val2014_000000210789.jpg", "What is on the table?", "no", "adversarial", None),
    ]
    assert [q.question_id for q in read_pope_questions(path, limit=2)] == [1, 2]
    assert read_pope_questions(path, limit=0) == []
    assert read_pope_questions(path, setting="random")[0].setting == "random"
    assert read_pope_questions(_jsonl(tmp_path / "questions.jsonl", POPE_RECORDS[:1]))[0].setting is None


def test_read_pope_questions_json_array(tmp_path):
    path = _json(tmp_path / "coco_pope_popular.json", POPE_RECORDS[:2])
    assert [q.label for q in read_pope_questions(path)] == ["yes", "no"]


@pytest.mark.parametrize("lines, where, problem", [
    ([POPE_RECORDS[0], "{not json"], "line 2", "not valid JSON"),
    ([{"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?"}], "line 1",
     "missing field 'label'"),
    ([{**POPE_RECORDS[0], "label": "maybe"}], "line 1", "field 'label' must be 'yes' or 'no'"),
    ([{**POPE_RECORDS[0], "question_id": None}], "line 1", "field 'question_id' must be int or str"),
    ([POPE_RECORDS[0], "", POPE_RECORDS[0]], "line 3", "question_id 1 appears twice"),
    (["[1, 2]"], "record 0", "expected a JSON object"),
])
def test_read_pope_questions_errors(tmp_path, lines, where, problem):
    path = _jsonl(tmp_path / "coco_pope_random.json", lines)
    with pytest.raises(FormatError, match=problem) as e:
        read_pope_questions(path)
    assert e.value.path == str(path) and e.value.record == where
    assert str(e.value).startswith(f"{path}: {where}: ")


def test_read_pope_questions_bad_arguments(tmp_path):
    path = _jsonl(tmp_path / "q.json", POPE_RECORDS[:1])
    with pytest.raises(ValueError, match="setting must be one of"):
        read_pope_questions(path, setting="hard")
    with pytest.raises(ValueError, match="limit must be"):
        read_pope_questions(path, limit=-1)
    with pytest.raises(FileNotFoundError):
        read_pope_questions(tmp_path / "missing.json")


def test_read_pope_answers_and_score(tmp_path):
    questions = read_pope_questions(_jsonl(tmp_path / "coco_pope_random.json", POPE_RECORDS))
    path = _jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 1, "prompt": "...", "text": "Yes, there is a snowboard."},
        {"question_id": 2, "answer": "No."},
        {"question_id": 3, "text": "There is not a table"},
    ])
    answers = read_pope_answers(path)
    assert answers == {1: "Yes, there is a snowboard.", 2: "No.", 3: "There is not a table"}
    s = pope_scores([q.label for q in questions], [answers[q.question_id] for q in questions])
    # labels yes, no, no; read yes, no, no -> tp 1, tn 2
    assert (s["tp"], s["tn"], s["fp"], s["fn"], s["accuracy"], s["f1"]) == (1, 2, 0, 0, 1.0, 1.0)
    assert read_pope_answers(path, limit=1) == {1: "Yes, there is a snowboard."}
    with pytest.raises(FormatError, match=r"line 1: missing the answer"):
        read_pope_answers(_jsonl(tmp_path / "bad.jsonl", [{"question_id": 1, "response": "Yes"}]))


# ------------------------------------------------------------------------------------------- COCO

INSTANCES = {
    "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
    "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 44, "name": "bottle"},
                   {"id": 67, "name": "dining table"}],
    "annotations": [{"id": 10, "image_id": 1, "category_id": 1}, {"id": 11, "image_id": 1, "category_id": 18},
                    {"id": 12, "image_id": 1, "category_id": 1}, {"id": 13, "image_id": 2, "category_id": 44}],
}
CAPTIONS = {"annotations": [
    {"image_id": 1, "caption": "A man walks his dog past a fire hydrant."},
    {"image_id": 2, "caption": "Bottles and teddy bears on a table."},
    {"image_id": 3, "caption": "An empty room."},
    {"image_id": 99, "caption": "A cat."},   # not among the images: ignored
]}


def test_read_coco_ground_truth(tmp_path):
    inst, caps = _json(tmp_path / "instances_val2014.json", INSTANCES), _json(tmp_path / "captions.json", CAPTIONS)
    gt = read_coco_ground_truth(inst, caps)
    assert gt == {1: {"person", "dog", "fire hydrant"}, 2: {"bottle", "teddy bear", "dining table"}, 3: set()}
    assert read_coco_ground_truth(inst) == {1: {"person", "dog"}, 2: {"bottle"}, 3: set()}
    assert list(read_coco_ground_truth(inst, caps, limit=2)) == [1, 2]
    assert read_coco_ground_truth(inst, [caps], image_ids=[3, 1]) == {1: {"person", "dog", "fire hydrant"},
                                                                       3: set()}
    with pytest.raises(ValueError, match=r"image ids \[42\] are not in"):
        read_coco_ground_truth(inst, image_ids=[42])
    # then CHAIR against it: "A dog on a couch." mentions dog (present) and couch (hallucinated)
    s = chair_scores([{"text": "A dog on a couch.", "ground_truth": gt[1]}])
    assert (s["chair_i"], s["chair_s"], s["recall"]) == (1 / 2, 1.0, 1 / 3)


def test_read_coco_ground_truth_merges_files(tmp_path):
    train = _json(tmp_path / "instances_train2014.json", {
        "images": [{"id": 7}], "categories": [{"id": 18, "name": "dog"}],
        "annotations": [{"image_id": 7, "category_id": 18}]})
    val = _json(tmp_path / "instances_val2014.json", INSTANCES)
    assert read_coco_ground_truth([val, train]) == {1: {"person", "dog"}, 2: {"bottle"}, 3: set(), 7: {"dog"}}


@pytest.mark.parametrize("change, where, problem", [
    (lambda d: d["categories"].append({"id": 62, "name": "tvmonitor"}), "categories[4]",
     "category 'tvmonitor' is not in the vocabulary"),
    (lambda d: d["annotations"].append({"image_id": 1, "category_id": 5}), "annotations[4]",
     "unknown category_id 5"),
    (lambda d: d["annotations"].append({"image_id": 5, "category_id": 1}), "annotations[4]",
     "image_id 5 is not among the images"),
    (lambda d: d["annotations"].append({"image_id": "1", "category_id": 1}), "annotations[4]",
     "field 'image_id' must be int"),
    (lambda d: d.pop("categories"), None, "missing list 'categories'"),
])
def test_read_coco_ground_truth_errors(tmp_path, change, where, problem):
    data = json.loads(json.dumps(INSTANCES))
    change(data)
    path = _json(tmp_path / "instances.json", data)
    with pytest.raises(FormatError, match=problem) as e:
        read_coco_ground_truth(path)
    assert e.value.path == str(path) and e.value.record == where


def test_read_coco_captions_errors(tmp_path):
    inst = _json(tmp_path / "instances.json", INSTANCES)
    bad = _json(tmp_path / "captions.json", {"annotations": [{"image_id": 1}]})
    with pytest.raises(FormatError, match=r"captions.json: annotations\[0\]: missing field 'caption'"):
        read_coco_ground_truth(inst, bad)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [}')
    with pytest.raises(FormatError, match=r"broken.json: not valid JSON .* line 1"):
        read_coco_ground_truth(broken)


# ------------------------------------------------------------------------------------------ AMBER


def test_read_amber_queries(tmp_path):
    path = _json(tmp_path / "query_all.json", [
        {"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."},
        {"id": 8633, "image": "AMBER_1.jpg", "query": "Is there a cloud in this image?"}])
    assert read_amber_queries(path) == [AmberQuery(1, "AMBER_1.jpg", "Describe this image."),
                                        AmberQuery(8633, "AMBER_1.jpg", "Is there a cloud in this image?")]
    assert len(read_amber_queries(path, limit=1)) == 1
    with pytest.raises(FormatError, match=r"record 0 \(id 1\): missing field 'query'"):
        read_amber_queries(_json(tmp_path / "bad.json", [{"id": 1, "image": "AMBER_1.jpg"}]))
    with pytest.raises(FormatError, match="expected a JSON array"):
        read_amber_queries(_json(tmp_path / "obj.json", {"id": 1}))


ANNOTATIONS = [
    {"id": 1, "type": "generative", "truth": ["sky", "person", "dog"], "hallu": ["cloud", "cat"]},
    {"id": 1005, "type": "discriminative-attribute-state", "truth": "yes"},
    {"id": 8633, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 13558, "type": "relation", "truth": "no"},
]


def test_read_amber_annotations(tmp_path):
    path = _json(tmp_path / "annotations.json", ANNOTATIONS)
    assert read_amber_annotations(path) == [
        AmberAnnotation(1, "generative", ("sky", "person", "dog"), ("cloud", "cat")),
        AmberAnnotation(1005, "discriminative-attribute-state", "yes"),
        AmberAnnotation(8633, "discriminative-hallucination", "no"),
        AmberAnnotation(13558, "relation", "no"),
    ]
    assert len(read_amber_annotations(path, limit=2)) == 2


@pytest.mark.parametrize("record, problem", [
    ({"id": 2, "type": "color", "truth": "yes"}, "unknown type 'color'"),
    ({"id": 2, "type": "generative", "truth": "yes", "hallu": []}, "field 'truth' must be list"),
    ({"id": 2, "type": "generative", "truth": ["sky"]}, "missing field 'hallu'"),
    ({"id": 2, "type": "generative", "truth": ["sky", 3], "hallu": []}, "must be a list of strings"),
    ({"id": 2, "type": "discriminative-hallucination", "truth": "maybe"}, "must be 'yes' or 'no'"),
    ({"id": 1, "type": "relation", "truth": "no"}, "id 1 appears twice"),
])
def test_read_amber_annotations_errors(tmp_path, record, problem):
    path = _json(tmp_path / "annotations.json", ANNOTATIONS[:1] + [record])
    with pytest.raises(FormatError, match=problem) as e:
        read_amber_annotations(path)
    assert e.value.record == f"record 1 (id {record['id']})"


def test_read_amber_vocabulary_files(tmp_path):
    rel = _json(tmp_path / "relation.json", {"sky": [], "person": ["man", "people"], "dog": [], "cloud": [],
                                             "cat": [], "sign": []})
    assert read_amber_association(rel)["person"] == ("man", "people")
    with pytest.raises(FormatError, match="entry 'sky': must be a list of strings"):
        read_amber_association(_json(tmp_path / "bad.json", {"sky": "blue"}))
    safe = tmp_path / "safe_words.txt"
    safe.write_text("orange\nsign\n\n individual")   # the release's file has no final newline
    assert read_amber_safe_words(safe) == ("orange", "sign", "individual")


def test_read_amber_responses_and_score(tmp_path):
    responses = [{"id": 1, "response": "A man and his dogs under a cloudy sky, near a sign."},
                 {"id": 8633, "response": "No"}]
    path = _json(tmp_path / "responses.json", responses)
    assert read_amber_responses(path) == {1: responses[0]["response"], 8633: "No"}
    assert read_amber_responses(_jsonl(tmp_path / "responses.jsonl", responses), limit=1) == {
        1: responses[0]["response"]}
    with pytest.raises(FormatError, match=r"record 1 \(id 1\): id 1 appears twice"):
        read_amber_responses(_json(tmp_path / "dup.json", responses[:1] * 2))
    rel = _json(tmp_path / "relation.json", {"sky": [], "person": ["man"], "dog": [], "cloud": [], "cat": [],
                                             "sign": []})
    safe = tmp_path / "safe.txt"
    safe.write_text("sign\n")
    s = amber_generative_scores(read_amber_annotations(_json(tmp_path / "a.json", ANNOTATIONS)),
                                read_amber_responses(path), read_amber_association(rel), read_amber_safe_words(safe))
    # object words: man, dog, sky, sign ("cloudy" is not "cloud"); covers person, dog, sky; nothing hallucinated
    assert (s["n"], s["nouns"], s["chair"], s["cover"], s["hal"], s["cog"]) == (1, 4, 0.0, 1.0, 0.0, 0.0)

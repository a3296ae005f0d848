"""Reading preference data: the canonical JSONL, the RLAIF-V / POVID / VLFeedback layouts (fixture files
written here in those layouts), parquet and saved Hugging Face datasets, and the errors that name the
record."""
import json

import pytest

from mmalign import data

from . import _fixtures as fx


def _records(path, **kw):
    return list(data.iter_records(path, **kw))


def test_canonical_jsonl_with_bad_lines(tmp_path):
    rows = fx.pairs(3)
    path = fx.write_jsonl(tmp_path / "in.jsonl", [rows[0], "{not json", "[1, 2]", rows[1],
                                                 {"id": "x", "prompt": "p", "chosen": "c"}, rows[2]])
    got = _records(path)
    assert [type(r).__name__ for r in got] == ["PairRecord", "RecordError", "RecordError", "PairRecord",
                                              "RecordError", "PairRecord"]
    assert str(got[1]) .startswith("record 1 (line 2): not valid JSON")
    assert "expected a JSON object" in str(got[2])
    assert str(got[4]).startswith("record 4 (id=x, line 5): missing column 'rejected'")
    assert got[3].index == 3 and got[3].line == 4 and got[3].id == "pair-1" and got[3].chosen == rows[1]["chosen"]
    assert got[5].canonical() == rows[2]


def test_extra_columns_are_carried_and_ids_default_to_the_index(tmp_path):
    path = fx.write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r", "image": "a.png",
                                                   "source": "x", "ref_chosen_logp": -1.5}])
    (rec,) = _records(path)
    assert rec.id == "0" and rec.canonical() == {"id": "0", "image": "a.png", "prompt": "p", "chosen": "c",
                                                "rejected": "r", "source": "x", "ref_chosen_logp": -1.5}


def test_rlaif_v_parquet_with_embedded_images(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    png = fx.shape_png("red", "circle")
    rows = [{"ds_name": "RLAIF-V", "image": {"bytes": png, "path": None}, "question": "What is shown?",
             "chosen": "A red circle.", "rejected": "A blue square.", "origin_dataset": "coco",
             "origin_split": '{"model": "x"}', "idx": str(i), "image_path": f"images/{i}.png"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rlaif.parquet")
    got = _records(tmp_path / "rlaif.parquet")
    assert [r.id for r in got] == ["RLAIF-V-0", "RLAIF-V-1", "RLAIF-V-2"]
    assert got[0].prompt == "What is shown?" and got[0].extra["origin_dataset"] == "coco"
    assert data.open_image(got[0].image).getpixel((24, 24)) == fx.COLOURS["red"]
    # the JSON form of an embedded image decodes to the same picture
    again = data.open_image(json.loads(json.dumps(got[0].canonical()))["image"])
    assert again.tobytes() == data.open_image(got[0].image).tobytes()
    assert data.count_records(tmp_path / "rlaif.parquet") == 3
    (tmp_path / "dir").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "dir" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), tmp_path / "dir" / "b.parquet")
    assert [r.index for r in _records(tmp_path / "dir")] == [0, 1, 2]


def test_povid_json_list(tmp_path):
    rows = [{"id": "p0", "image": "COCO_1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe this image in detail."}, {"from": "gpt", "value": "..."}],
        "chosen": "A dog.", "rejected": "A cat."},
        {"id": "p1", "image": "COCO_2.jpg", "conversations": [], "chosen": "x", "rejected": "y"}]
    (tmp_path / "povid.json").write_text(json.dumps(rows))
    got = _records(tmp_path / "povid.json")
    assert got[0].prompt == "Describe this image in detail." and got[0].image == "COCO_1.jpg"
    assert isinstance(got[1], data.RecordError) and "conversations" in str(got[1]) and "id=p1" in str(got[1])


def _vlfeedback_row(i, ratings):
    comps = [{"annotations": {aspect: {"Rating": str(r), "Rationale": "..."} for aspect in
                              ("Helpfulness", "Ethical Considerations", "Visual Faithfulness")},
              "model": f"model-{k}", "response": f"response {k} of {i}"} for k, r in enumerate(ratings)]
    return {"id": f"vlf-{i}", "prompt": "What is the main focus?", "models": [c["model"] for c in comps],
            "completions": comps, "img_path": f"svit/{i}.jpg"}


def test_vlfeedback_picks_best_and_worst(tmp_path):
    rows = [_vlfeedback_row(0, [3, 5, 1, 4]), _vlfeedback_row(1, [2, 2, 2, 2])]
    rows[0]["completions"][0]["annotations"]["Helpfulness"]["Rating"] = "N/A"  # ignored aspect
    got = _records(fx.write_jsonl(tmp_path / "vlf.jsonl", rows))
    assert got[0].chosen == "response 1 of 0" and got[0].rejected == "response 2 of 0"
    assert got[0].extra["chosen_model"] == "model-1" and got[0].image == "svit/0.jpg"
    assert isinstance(got[1], data.RecordError) and "no preference" in str(got[1])


def test_vlfeedback_from_a_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [_vlfeedback_row(i, [1 + i % 3, 5, 2, 3]) for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    got = _records(tmp_path / "hf")
    assert [r.id for r in got] == ["vlf-0", "vlf-1", "vlf-2"]
    assert all(r.chosen.startswith("response 1") for r in got)


def test_column_mapping_and_layout_errors(tmp_path):
    path = fx.write_jsonl(tmp_path / "in.jsonl", [{"q": "p", "good": "c", "bad": "r", "img": "a.png"}])
    with pytest.raises(ValueError, match="cannot tell the dataset layout"):
        _records(path)
    (rec,) = _records(path, columns={"prompt": "q", "chosen": "good", "rejected": "bad", "image": "img"})
    assert (rec.prompt, rec.chosen, rec.rejected, rec.image) == ("p", "c", "r", "a.png")
    with pytest.raises(ValueError, match="columns: keys must be canonical"):
        _records(path, columns={"question": "q"})
    with pytest.raises(ValueError, match="layout: expected"):
        _records(path, layout="nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _records(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="expected .jsonl"):
        _records(fx.write_jsonl(tmp_path / "in.csv", []))


def test_open_image_errors(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png.*not a decodable image"):
        data.open_image("broken.png", tmp_path)
    with pytest.raises(ValueError, match="missing.png.*cannot read"):
        data.open_image("missing.png", tmp_path)
    with pytest.raises(ValueError, match="URLs are not fetched"):
        data.open_image("http://example.com/a.png")
    with pytest.raises(ValueError, match="empty"):
        data.open_image(None)
    fx.write_images(tmp_path)
    assert data.open_image(str(tmp_path / "blue_square.png")).getpixel((24, 24)) == fx.COLOURS["blue"]

"""Text sources and batching for the statistics / calibration / report steps."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from hf_performer.conversion.corpus import pydoc_paragraphs
from hf_performer.conversion.data import BatchSchedule, collate, read_texts
from hf_performer.conversion.errors import ConversionError


def test_text_file_lines_paragraphs_and_folder(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first document\nsecond  document\n\n")
    assert read_texts(lines) == ["first document", "second document"]
    paras = tmp_path / "sub" / "paras.txt"
    paras.parent.mkdir()
    paras.write_text("one paragraph\nwrapped here\n\nanother one\n")
    assert read_texts(paras) == ["one paragraph wrapped here", "another one"]
    assert read_texts(tmp_path) == ["first document", "second document", "one paragraph wrapped here", "another one"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConversionError, match="no .txt files"):
        read_texts(empty)
    with pytest.raises(ConversionError, match="no such file"):
        read_texts(tmp_path / "missing.txt")


def test_table_files_give_their_text_column(tmp_path):
    """.jsonl/.json/.csv/.tsv files are tables (datasets' builders): their "text" column, else their only string
    column. They were read as raw text, so the documents were JSON lines and CSV rows, header and quotes included
    (found in a bug hunt)."""
    docs = ["First document, with a comma.", 'A "quoted" second one.']
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "label": i}) + "\n" for i, d in enumerate(docs)))
    (tmp_path / "b.json").write_text(json.dumps([{"label": i, "body": d} for i, d in enumerate(docs)]))
    with open(tmp_path / "c.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label", "text"], *[[i, d] for i, d in enumerate(docs)]])
    with open(tmp_path / "d.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["text"], *[[d] for d in docs]])
    for name in ("a.jsonl", "b.json", "c.csv", "d.tsv"):
        assert read_texts(tmp_path / name) == docs, name
    with open(tmp_path / "g.csv", "w", newline="") as f:  # one string column, not named text: it is the text
        csv.writer(f).writerows([["label", "body"], *[[i, d] for i, d in enumerate(docs)]])
    assert read_texts(tmp_path / "g.csv") == docs  # (datasets types csv string columns large_string)
    (tmp_path / "e.csv").write_text("label,score\n1,2\n")
    with pytest.raises(ConversionError, match="no 'text' column and no string column"):
        read_texts(tmp_path / "e.csv")
    # an id and a body, neither named text: refused, not guessed (the first string column was the ids)
    (tmp_path / "f.jsonl").write_text("".join(json.dumps({"doc_id": f"doc-{i}", "content": d}) + "\n"
                                              for i, d in enumerate(docs)))
    with pytest.raises(ConversionError, match=r"string columns \['doc_id', 'content'\]: name the text column"):
        read_texts(tmp_path / "f.jsonl")



@pytest.mark.parametrize("name, content", [("empty.jsonl", b""), ("blank.json", b"\n \n"), ("empty.csv", b""),
                                           ("header.csv", b"text\n"), ("rows.json", b"[]"), ("empty.tsv", b"")])
def test_a_table_without_rows_holds_no_text(tmp_path, name, content):
    """Empty tables get the message an empty .txt gets (they raised datasets' internals: a bare StopIteration, its
    generation error, or 'Instruction "train" corresponds to no data!'; found by a bug-hunt helper)."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ConversionError, match=f"{name}' holds no text"):
        read_texts(tmp_path / name)


def test_a_table_not_in_utf8_is_one_clear_error(tmp_path):
    """datasets decodes a table's strings lazily, when its column is read: a Latin-1 .jsonl raised a raw
    UnicodeDecodeError from pyarrow instead of the one-line error a Latin-1 .txt gets."""
    (tmp_path / "latin.jsonl").write_bytes('{"text": "café au lait"}\n'.encode("latin-1"))
    with pytest.raises(ConversionError, match="cannot read .*latin.jsonl.*UnicodeDecodeError.*save it as UTF-8"):
        read_texts(tmp_path / "latin.jsonl")

def test_builtin_text_is_the_python_docs_corpus_unless_a_path_has_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert read_texts("python-docs") == pydoc_paragraphs("all")  # offline, whatever the working directory
    (tmp_path / "python-docs").write_text("a file of my own\n")
    assert read_texts("python-docs") == ["a file of my own"]  # a path of that name is read as a path


def test_builtin_text_without_pydoc_data_names_the_fix(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # as in Python builds that leave it out
    with pytest.raises(ConversionError, match="pydoc_data.*--calibration-data.*--zero-shot"):
        read_texts("python-docs")


@pytest.mark.slow
def test_dataset_name_offline_fails_clearly(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConversionError, match="datasets"):
        read_texts("someone/some-unavailable-dataset:default:train")


def test_schedule_is_deterministic_bucketed_and_endless():
    seqs = [[1] * n for n in (3, 9, 4, 8, 5, 7, 6, 2)]
    s = BatchSchedule(seqs, batch_size=2, pad_token_id=0, seed=1)
    assert len(s) == 4
    first = [s.batch(i)["attention_mask"].sum(1).tolist() for i in range(8)]
    again = [BatchSchedule(seqs, 2, 0, seed=1).batch(i)["attention_mask"].sum(1).tolist() for i in range(8)]
    assert first == again
    assert sorted(map(sorted, first[:4])) == [[2, 3], [4, 5], [6, 7], [8, 9]]  # similar lengths together
    assert sorted(map(sorted, first[4:])) == sorted(map(sorted, first[:4]))  # the next epoch reuses the buckets
    b = collate([[5, 6, 7], [8]], pad_token_id=0)
    assert torch.equal(b["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(b["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))


def test_pydoc_splits_share_no_paragraph():
    train, held_out = pydoc_paragraphs("train"), pydoc_paragraphs("eval")
    assert len(train) > 100 and len(held_out) > 50
    assert not set(train) & set(held_out)
    assert all(not p.startswith(" ") and len(p.split()) >= 20 for p in held_out)

"""The tokenized-data cache: hits reproduce the data; any change of its keys prepares anew."""

from __future__ import annotations

import dataclasses
import json

from transformers import AutoTokenizer

from alpaca_cot.config import FinetuneArgs
from alpaca_cot.data.prepared import prepare_splits
from alpaca_cot.data.templates import get_template
from tests.conftest import shared_path


def test_cache_hits_and_invalidates(tmp_path, alpaca_file: str) -> None:
    tok = AutoTokenizer.from_pretrained(shared_path("models", "stories260K-hf"))
    data = tmp_path / "d.json"
    data.write_text(open(alpaca_file, encoding="utf-8").read(), encoding="utf-8")
    args = FinetuneArgs(model_name_or_path="x", data=[str(data)], val_set_size=10, cutoff_len=1024)
    template = get_template("alpaca", tok)
    cache = str(tmp_path / "cache")

    def prepare(a=args, t=template, tokenizer=tok):
        return prepare_splits(a, tokenizer, t, cache_dir=cache)

    train, val, info = prepare()
    assert info["cache"] == "miss" and len(val) == 10
    train2, val2, info2 = prepare()
    assert info2["cache"] == "hit" and info2["cache_file"] == info["cache_file"]
    assert [train2[i] for i in range(len(train2))] == [train[i] for i in range(len(train))]
    assert prepare(dataclasses.replace(args, cutoff_len=900))[2]["cache"] == "miss"
    assert prepare(dataclasses.replace(args, train_on_inputs=True))[2]["cache"] == "miss"
    assert prepare(dataclasses.replace(args, val_set_size=5))[2]["cache"] == "miss"
    moss = get_template("moss", tok)
    assert prepare(t=moss)[2]["cache"] == "miss"
    other_tok = AutoTokenizer.from_pretrained(shared_path("models", "llama2-tokenizer"))
    assert prepare(tokenizer=other_tok)[2]["cache"] == "miss"
    records = json.loads(data.read_text(encoding="utf-8"))
    records[0]["output"] += " (edited)"
    data.write_text(json.dumps(records), encoding="utf-8")
    assert prepare()[2]["cache"] == "miss"
    assert prepare()[2]["cache"] == "hit"

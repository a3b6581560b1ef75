import json

import pytest

from zoedge.errors import ZoedgeError
from zoedge.manifest import SCHEMA_VERSION, LoraSpec, Manifest, TensorSpec, Trainable


def make() -> Manifest:
    return Manifest(
        model_id="m", architecture="bert", kind="encoder", task="classify", max_length=16,
        inputs=[TensorSpec("input_ids", ["batch", "seq"], "int64")],
        outputs=[TensorSpec("logits", ["batch", 2], "float32")],
        trainables=[Trainable("base_model.model.x.lora_A.weight", [4, 8], "lora_A", "base_model.model.x.lora_A.weight", "x.lora_A")],
        trainable_kinds=["lora"], base_sha256="ab" * 32, labels=["neg", "pos"],
        lora=LoraSpec(4, 8.0, ["q"], ["query"]),
    )


def test_round_trip(tmp_path):
    m = make()
    m.save(tmp_path)
    back = Manifest.load(tmp_path)
    assert back == m
    assert back.num_trainable == 32
    assert json.loads((tmp_path / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION


def test_unknown_keys_are_ignored(tmp_path):
    d = make().to_dict()
    d["from_the_future"] = 1
    d["trainables"][0]["also_new"] = True
    assert Manifest.from_dict(d).trainables[0].shape == [4, 8]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema_version=99), "schema version"),
    (lambda d: d.update(task="dance"), "unknown task"),
    (lambda d: d["trainables"][0].update(shape=[4, -1]), "bad shape"),
    (lambda d: d["trainables"][0].update(role="magic"), "unknown role"),
    (lambda d: d.update(labels=["only"]), "two labels"),
    (lambda d: d.update(trainables="nope"), "malformed"),
    (lambda d: d.update(prompt_candidates=["no placeholder"]), "prompt candidate"),
    (lambda d: d.update(prompt_candidates="{sentence}"), "list of strings"),
])
def test_bad_manifests_are_refused(mutate, message):
    d = make().to_dict()
    mutate(d)
    with pytest.raises(ZoedgeError, match=message):
        Manifest.from_dict(d)


def test_not_a_bundle(tmp_path):
    with pytest.raises(ZoedgeError, match="not a zoedge bundle"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ZoedgeError, match="not valid JSON"):
        Manifest.load(tmp_path)

"""GPT-2 in and out (model/pretrained.py), offline, on small files written here in the
hub's real formats (tests/hf_files.py): loading, generation, the Conv1D transpose, the
round trip through save_pretrained, the tokenizer, hub names (a fake hub client), and a
one-line error for each bad input. transformers, when installed, reads what we write."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import sample
import train
from model import pretrained
from model.generate import generate
from model.gpt import GPT, GPTConfig
from model.pretrained import PretrainedError
from model.tokenizer import GPT2BPETokenizer
from tinygrad_lite import backend, manual_seed, no_grad

from hf_files import bytes_to_unicode, gpt2_config, gpt2_weights, write_gpt2_dir, write_gpt2_tokenizer

IDS = np.array([[5, 40, 3, 200, 17, 260, 8]])


# --- a reference GPT-2, written from the file's layout alone (Conv1D: x @ W + b) --------------


def reference_logits(weights: dict, config: dict, ids: np.ndarray) -> np.ndarray:
    """GPT-2's forward in float64 NumPy, reading the hub's key names and (in, out) matrices."""
    w = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in weights.items()}
    H, eps = config["n_head"], config["layer_norm_epsilon"]

    def norm(x, name):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def conv1d(x, name):
        return x @ w[name + ".weight"] + w[name + ".bias"]
    T = ids.shape[1]
    x = w["wte.weight"][ids] + w["wpe.weight"][:T]  # (B, T, C)
    B, _, C = x.shape
    mask = np.triu(np.ones((T, T), bool), 1)
    for i in range(config["n_layer"]):
        h = f"h.{i}."
        q, k, v = np.split(conv1d(norm(x, h + "ln_1"), h + "attn.c_attn"), 3, axis=-1)
        q, k, v = (t.reshape(B, T, H, C // H).transpose(0, 2, 1, 3) for t in (q, k, v))
        scores = np.where(mask, -np.inf, q @ k.transpose(0, 1, 3, 2) / np.sqrt(C // H))
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + conv1d((att @ v).transpose(0, 2, 1, 3).reshape(B, T, C), h + "attn.c_proj")
        m = conv1d(norm(x, h + "ln_2"), h + "mlp.c_fc")
        m = 0.5 * m * (1 + np.tanh(np.sqrt(2 / np.pi) * (m + 0.044715 * m ** 3)))
        x = x + conv1d(m, h + "mlp.c_proj")
    return norm(x, "ln_f") @ w["wte.weight"].T  # (B, T, V): the head is tied to wte


def our_logits(model: GPT, ids: np.ndarray) -> np.ndarray:
    with no_grad():
        return model.eval()(ids)[0].numpy()


@pytest.fixture
def gpt2_dir(tmp_path) -> Path:
    return write_gpt2_dir(tmp_path / "gpt2")  # the hub's layout: unprefixed keys, mask buffers


def folder_weights(folder: Path) -> tuple[dict, dict]:
    return load_file(str(folder / "model.safetensors")), json.loads((folder / "config.json").read_text())


# --- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_loads_gpt2_and_matches_the_reference(tmp_path, prefix):
    """Both key spellings (GPT2Model's and GPT2LMHeadModel's) give the reference's logits."""
    folder = write_gpt2_dir(tmp_path / "m", prefix=prefix)
    weights, config = folder_weights(folder)
    model = GPT.from_pretrained(folder)
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (2, 3, 12)
    assert model.config.block_size == 32 and model.config.bias and model.config.pos == "learned"
    np.testing.assert_allclose(our_logits(model, IDS), reference_logits(weights, config, IDS), rtol=1e-4, atol=1e-4)


def test_the_conv1d_transpose_matters(gpt2_dir):
    """The check above can fail: c_attn (C x 3C) read without its transpose does not even load,
    and the square c_proj read without it gives other logits."""
    weights, config = folder_weights(gpt2_dir)
    model = GPT.from_pretrained(gpt2_dir)
    # Conv1D's (in, out) is the memory of Linear's column-major (out, in) W: loaded as it lies
    assert all(backend.column_major(block.attn.c_attn.weight.data) for block in model.h)
    wrong = {**weights, "h.0.attn.c_proj.weight": weights["h.0.attn.c_proj.weight"].T.copy()}
    assert np.abs(our_logits(model, IDS) - reference_logits(wrong, config, IDS)).max() > 1e-2
    save_file({**weights, "h.0.attn.c_attn.weight": weights["h.0.attn.c_attn.weight"].T.copy()},
              str(gpt2_dir / "model.safetensors"))
    with pytest.raises(PretrainedError, match=r"'h.0.attn.c_attn.weight' has shape \(36, 12\), expected \(12, 36\)"):
        GPT.from_pretrained(gpt2_dir)


def test_generates_the_reference_greedy_tokens(gpt2_dir):
    weights, config = folder_weights(gpt2_dir)
    model = GPT.from_pretrained(gpt2_dir)
    prompt = [5, 40, 3]
    ours = generate(model, prompt, 6, temperature=0.0)[0]
    ids = list(prompt)
    for _ in range(6):  # greedy with the reference, no cache
        ids.append(int(reference_logits(weights, config, np.array([ids]))[0, -1].argmax()))
    assert ours == ids[3:]
    assert generate(model, prompt, 6, temperature=0.0, use_cache=False)[0] == ours


def test_the_tokenizer_comes_with_the_weights(gpt2_dir):
    model = GPT.from_pretrained(gpt2_dir)
    tok = model.tokenizer
    assert isinstance(tok, GPT2BPETokenizer) and tok.vocab_size == model.config.vocab_size == 273
    text = "the king and the queen, 'tis 42!\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(" the") == [258]  # ' the' is one token: merges "Ġ t" + "h e" + "Ġt he"


def test_the_tokenizer_matches_tiktokens_own_reader_of_these_files(tmp_path, monkeypatch):
    """tiktoken's data_gym reader (GPT-2's original file format) builds the same ranks."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the files, cache nothing
    write_gpt2_tokenizer(tmp_path)
    ranks = data_gym_to_mergeable_bpe_ranks(str(tmp_path / "merges.txt"), str(tmp_path / "vocab.json"))
    ours = GPT2BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert ours.enc._mergeable_ranks == ranks
    assert len(bytes_to_unicode()) == 256


def test_peak_memory_of_loading_stays_near_the_models_size(tmp_path):
    """One tensor at a time: loading a 4.5M-parameter GPT-2 (18 MB) peaks well under 3x it."""
    import subprocess
    folder = write_gpt2_dir(tmp_path / "wide", n_embd=192, n_head=3, n_layer=2, n_positions=256, tokenizer=False,
                            vocab_size=12000)
    code = ("import resource, sys; sys.path.insert(0, 'tests'); from model.gpt import GPT; "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"m = GPT.from_pretrained({str(folder)!r}); "
            "print(m.num_parameters(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    params, grown_kb = map(int, done.stdout.split())
    model_mb = params * 4 / 2**20
    assert grown_kb / 1024 < 3 * model_mb + 10, (params, grown_kb, model_mb)


# --- saving ------------------------------------------------------------------------------------


def test_round_trip_through_save_pretrained(gpt2_dir, tmp_path):
    model = GPT.from_pretrained(gpt2_dir)
    out = model.save_pretrained(tmp_path / "saved")
    saved, config = folder_weights(out)
    hub, _ = folder_weights(gpt2_dir)
    expected = {"transformer." + k for k in hub if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert set(saved) == expected  # GPT2LMHeadModel's names, no lm_head (tied), no mask buffers
    for key, value in saved.items():
        assert value.shape == hub[key.removeprefix("transformer.")].shape, key  # Conv1D (in, out) again
    assert config["n_positions"] == 32 and config["model_type"] == "gpt2"
    again = GPT.from_pretrained(out)
    np.testing.assert_array_equal(our_logits(again, IDS), our_logits(model, IDS))
    assert (out / "vocab.json").read_text() and again.tokenizer.to_dict() == model.tokenizer.to_dict()


def test_a_model_without_biases_exports_zero_biases(tmp_path):
    manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=8, bias=False))
    out = model.save_pretrained(tmp_path / "nobias")
    weights, _ = folder_weights(out)
    biases = [k for k in weights if k.endswith(".bias")]
    assert len(biases) == 2 * 6 + 1 and all(not weights[k].any() for k in biases)
    np.testing.assert_allclose(our_logits(GPT.from_pretrained(out), IDS[:, :5] % 20),
                               our_logits(model, IDS[:, :5] % 20), rtol=1e-6, atol=1e-6)


def test_a_rope_model_cannot_be_exported(tmp_path):
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=8, pos="rope"))
    with pytest.raises(PretrainedError, match="rope positions cannot be saved as GPT-2, which has learned"):
        model.save_pretrained(tmp_path / "rope")
    assert not (tmp_path / "rope").exists()


# --- bad inputs: one line each --------------------------------------------------------------------


def damage(folder: Path, kind: str) -> None:
    weights, config = folder_weights(folder)
    if kind == "no config":
        (folder / "config.json").unlink()
    elif kind == "missing key":
        del weights["h.1.mlp.c_fc.bias"]
        save_file(weights, str(folder / "model.safetensors"))
    elif kind == "wrong shape":
        weights["wpe.weight"] = weights["wpe.weight"][:10]
        save_file(weights, str(folder / "model.safetensors"))
    elif kind == "unknown architecture":
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama",
                                                         "architectures": ["LlamaForCausalLM"]}))
    elif kind == "vocab larger than the tokenizer":
        (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
        save_file({**weights, "wte.weight": np.zeros((300, 12), np.float32)}, str(folder / "model.safetensors"))
    elif kind == "other activation":
        (folder / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    elif kind == "config not json":
        (folder / "config.json").write_text("{")
    elif kind == "weights not safetensors":
        (folder / "model.safetensors").write_bytes(b"\x00" * 64)


BAD = {
    "no config": r"has no config\.json: a pretrained model folder needs config\.json and model\.safetensors",
    "missing key": r"model\.safetensors lacks 1 weight\(s\), e\.g\. 'h\.1\.mlp\.c_fc\.bias'",
    "wrong shape": r"'wpe\.weight' has shape \(10, 12\), expected \(32, 12\)",
    "unknown architecture": r"unknown architecture \(model_type 'llama', architectures \['LlamaForCausalLM'\]\)",
    "vocab larger than the tokenizer": r"vocab_size 300 in config\.json is larger than its tokenizer's 273 tokens",
    "other activation": r"this GPT-2 variant is not supported: activation_function 'relu'",
    "config not json": r"config\.json is not valid JSON",
    "weights not safetensors": r"model\.safetensors cannot be read",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_pretrained_folders_get_one_line_errors(kind, gpt2_dir):
    damage(gpt2_dir, kind)
    with pytest.raises((PretrainedError, ValueError), match=BAD[kind]) as e:
        GPT.from_pretrained(gpt2_dir)
    assert "\n" not in str(e.value)


def test_a_folder_that_is_neither_kind_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError, match="neither an out dir of train.py .* nor a pretrained model folder"):
        GPT.from_pretrained(tmp_path / "empty")


# --- names on the hub (a fake huggingface_hub: nothing is downloaded) ------------------------------


def fake_hub(monkeypatch, source: Path | None, tamper: str | None = None, error: Exception | None = None):
    """Install a huggingface_hub stand-in that 'downloads' from the folder `source` and
    reports the hub's hashes of the untampered files."""
    import hashlib
    module = types.ModuleType("huggingface_hub")
    calls = []

    def sibling(name):
        data = (source / name).read_bytes()
        if name == "model.safetensors":
            return types.SimpleNamespace(rfilename=name, blob_id=None,
                                         lfs=types.SimpleNamespace(sha256=hashlib.sha256(data).hexdigest()))
        return types.SimpleNamespace(rfilename=name, lfs=None,
                                     blob_id=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())

    class HfApi:
        def model_info(self, repo, files_metadata=False):
            calls.append(("info", repo))
            if error is not None:
                raise error
            return types.SimpleNamespace(sha="abc123", siblings=[sibling(p.name) for p in source.iterdir()])

    def hf_hub_download(repo, filename, revision=None):
        calls.append(("download", repo, filename, revision))
        target = source.parent / "hub-cache" / filename
        target.parent.mkdir(exist_ok=True)
        data = (source / filename).read_bytes()
        target.write_bytes(data + b" " if filename == tamper else data)
        return str(target)
    module.HfApi, module.hf_hub_download = HfApi, hf_hub_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    elsewhere = source.parent / "cwd"
    elsewhere.mkdir(exist_ok=True)
    monkeypatch.chdir(elsewhere)  # so the bare name "gpt2" is not a folder here
    return calls


def test_a_hub_name_is_downloaded_and_its_hashes_checked(gpt2_dir, monkeypatch):
    calls = fake_hub(monkeypatch, gpt2_dir)
    model = GPT.from_pretrained("gpt2")
    assert ("info", "openai-community/gpt2") in calls
    assert ("download", "openai-community/gpt2", "model.safetensors", "abc123") in calls
    assert model.tokenizer.vocab_size == 273


@pytest.mark.parametrize("tamper", ["model.safetensors", "config.json"])
def test_a_download_that_does_not_match_the_hubs_hash_is_refused(gpt2_dir, monkeypatch, tamper):
    fake_hub(monkeypatch, gpt2_dir, tamper=tamper)
    with pytest.raises(PretrainedError, match=f"does not match the hub's hash for openai-community/gpt2/{tamper}"):
        GPT.from_pretrained("gpt2")


def test_offline_a_hub_name_says_to_pass_a_folder(gpt2_dir, monkeypatch, capsys):
    fake_hub(monkeypatch, gpt2_dir, error=ConnectionError("Max retries exceeded with url: /api/models/..."))
    with pytest.raises(PretrainedError, match="cannot get 'gpt2' from the Hugging Face hub .*ConnectionError.*"
                                              "pass its folder .* to --init-from instead"):
        GPT.from_pretrained("gpt2")
    code = sample.main(["--init-from", "gpt2", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: cannot get 'gpt2' from the Hugging Face hub")


def test_without_huggingface_hub_a_name_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PretrainedError, match=r"needs huggingface_hub: pip install 'tinygrad_lite\[hf\]'"):
        GPT.from_pretrained("distilgpt2")


# --- the scripts -----------------------------------------------------------------------------------


def test_train_fine_tunes_a_gpt2_folder_and_sample_reads_both(gpt2_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the king and the queen shall speak; the king is in.\n" * 60, encoding="utf-8")
    out = tmp_path / "tuned"
    flags = ["--init-from", gpt2_dir, "--data", text, "--out-dir", out, "--max-iters", 3, "--block-size", 16,
             "--batch-size", 2, "--grad-accum", 1, "--eval-iters", 1, "--eval-interval", 3, "--no-progress",
             "--shards", 1]
    assert train.main([str(f) for f in flags]) == 0
    from model.checkpoint import load_checkpoint
    state, meta, _ = load_checkpoint(out)
    assert meta["config"]["preset"] == "finetune-gpt2" and meta["config"]["lr"] == 3e-5
    assert state["wpe.weight"].shape == (16, 12)  # cropped from 32 positions to the block size
    assert meta["tokenizer"]["kind"] == "gpt2-bpe" and meta["iter_num"] == 3
    capsys.readouterr()
    for source in (["--init-from", str(gpt2_dir)], ["--out-dir", str(out)], ["--init-from", str(out)]):
        assert sample.main([*source, "--prompt", "the king", "--max-new-tokens", "4", "--temperature", "0"]) == 0
        assert capsys.readouterr().out.startswith("the king")


def test_speculative_decoding_with_a_pretrained_draft(gpt2_dir, tmp_path, capsys):
    draft = write_gpt2_dir(tmp_path / "draft", seed=1, n_layer=1)
    argv = ["--init-from", str(gpt2_dir), "--draft-init-from", str(draft), "--prompt", "the king",
            "--max-new-tokens", "6", "--temperature", "0"]
    assert sample.main(argv) == 0
    speculative = capsys.readouterr().out
    assert sample.main(argv[:2] + argv[4:]) == 0
    assert capsys.readouterr().out == speculative  # greedy speculative output == plain greedy


# --- transformers reads what we write (when it is installed) ---------------------------------------


def test_transformers_gives_our_logits_both_ways(gpt2_dir, tmp_path):
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers import GPT2LMHeadModel
    if backend.default_device() != "cpu":
        pytest.skip("compared on the CPU")
    ours = GPT.from_pretrained(gpt2_dir)
    theirs = GPT2LMHeadModel.from_pretrained(str(gpt2_dir)).eval()  # the hub layout, read by them
    with torch.no_grad():
        hf_logits = theirs(torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(our_logits(ours, IDS), hf_logits, rtol=1e-4, atol=1e-4)
    manual_seed(3)
    trained_here = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=8, bias=False))
    folder = trained_here.save_pretrained(tmp_path / "ours")  # ours, read by them
    with torch.no_grad():
        hf_logits = GPT2LMHeadModel.from_pretrained(str(folder)).eval()(torch.from_numpy(IDS % 30)).logits.numpy()
    np.testing.assert_allclose(our_logits(trained_here, IDS % 30), hf_logits, rtol=1e-4, atol=1e-4)


def test_gpt2_config_fields_match_the_hub_file():
    """The fixture's config.json has the hub gpt2's fields (checked here so it cannot drift)."""
    fields = {"activation_function", "architectures", "attn_pdrop", "bos_token_id", "embd_pdrop", "eos_token_id",
              "initializer_range", "layer_norm_epsilon", "model_type", "n_ctx", "n_embd", "n_head", "n_layer",
              "n_positions", "resid_pdrop", "summary_activation", "summary_first_dropout", "summary_proj_to_labels",
              "summary_type", "summary_use_proj", "task_specific_params", "vocab_size"}
    assert set(gpt2_config(50257, 1024, 768, 12, 12)) == fields
    keys = gpt2_weights(gpt2_config(50, 8, 6, 1, 2))
    assert sorted(keys)[:4] == ["h.0.attn.bias", "h.0.attn.c_attn.bias", "h.0.attn.c_attn.weight",
                                "h.0.attn.c_proj.bias"]
    assert keys["h.0.attn.c_attn.weight"].shape == (6, 18) and keys["h.0.mlp.c_proj.weight"].shape == (24, 6)
    assert pretrained.our_name("transformer.h.3.attn.masked_bias") is None

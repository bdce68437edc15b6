"""tools/norm_tweak_check.py: its "before" is the runtime's own perplexity of the file, and an optimizer that
cannot move (lr 0) leaves the model as it was."""
import pytest


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("norm-tweak") / "text.txt"
    path.write_text(" ".join(f"The {n}th line says {n * 7 % 13} things about {n % 5} rivers." for n in range(400)))
    return path


def test_before_is_the_runtimes_perplexity_and_lr_0_changes_nothing(tiny_models, text, capsys):
    import fixtures
    from norm_tweak_check import main

    import mxq
    from mxq.runtime.perplexity import perplexity

    path = tiny_models["tiny-llama"]
    result = main([str(path), str(fixtures.ensure("tiny-llama")), "--epochs", "1", "--lr", "0", "--calib-tokens",
                   "512", "--text", str(text), "--ctx", "64", "--max-chunks", "3"])
    with mxq.load(path) as model:
        runtime = perplexity(model, model.tokenizer.encode(text.read_text()), ctx=64, max_chunks=3, progress=False)
        layers = model.config.num_hidden_layers
    assert result["before"] == pytest.approx(runtime["ppl"], rel=1e-4)
    assert result["after"] == result["before"] and result["ratio"] == 1.0
    out = capsys.readouterr().out
    assert f"{2 * layers + 1} norm weights" in out  # a Llama layer's two norms, and the final norm
    assert "epoch 1: calibration KL" in out and "perplexity before" in out


def test_training_lowers_the_calibration_kl(tiny_models, text, capsys):
    import fixtures
    from norm_tweak_check import main

    main([str(tiny_models["tiny-llama"]), str(fixtures.ensure("tiny-llama")), "--epochs", "4", "--lr", "1e-2",
          "--calib-tokens", "512", "--batch", "2", "--text", str(text), "--ctx", "64", "--max-chunks", "1"])
    kl = [float(line.split("KL ")[1].split()[0]) for line in capsys.readouterr().out.splitlines() if "calibration KL" in line]
    assert len(kl) == 4 and kl[-1] < kl[0]

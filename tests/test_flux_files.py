"""The file commands on trained FLUX runs (issue 27 §2, §3, §4): a tiny-flux2
and a tiny-flux run go through convert -> inspect -> merge -> fuse (a folder
and BFL's single transformer file) -> plain diffusers, which draws what the
LoRA at scale 1 draws; families do not mix; and data-parallel training."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_photos
from lorabooth import TrainConfig, train
from lorabooth.commands.cli import main
from lorabooth.formats import KOHYA_WEIGHT_NAME, WEIGHT_NAME
from lorabooth.formats.layouts import read_as_peft
from lorabooth.formats.merging import delta, modules_of

FAMILIES = {"tiny-flux2": "flux2", "tiny-flux": "flux1"}
OTHER = {"tiny-flux2": "tiny-flux", "tiny-flux": "tiny-flux2"}
PROMPT = "a photo of sks dog"


def _train(photos, out, model, seed):
    return train(TrainConfig(model=model, instance_dir=str(photos), instance_prompt=PROMPT,
                             steps=3, seed=seed, resolution=32, lr=1e-2, output=str(out)))


@pytest.fixture(scope="module")
def flux_photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("flux_files") / "photos")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def runs(request, flux_photos, tmp_path_factory):
    """Two runs of one family (seeds 0 and 1): what merge combines."""
    model, root = request.param, tmp_path_factory.mktemp(request.param)
    return model, _train(flux_photos, root / "a", model, 0), _train(flux_photos, root / "b", model, 1)


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def _same(a, b):
    x, y = (load_file(f) if not isinstance(f, dict) else f for f in (a, b))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def test_convert_round_trips_both_layouts_exactly(runs, tmp_path, capsys):
    model, run, _ = runs
    diffusers, kohya = run / WEIGHT_NAME, run / KOHYA_WEIGHT_NAME
    for src, to, back in ((diffusers, "kohya", "diffusers"), (kohya, "diffusers", "kohya"),
                          (diffusers, "peft", "diffusers")):
        there, again = tmp_path / f"{to}.safetensors", tmp_path / f"{to}-{back}.safetensors"
        assert _cli(capsys, "convert", src, there, "--to", to)[0] == 0
        assert _cli(capsys, "convert", there, again, "--to", back)[0] == 0
        _same(src, again)  # bit for bit: the fused qkv splits back into q, k and v
    # and the kohya file convert writes is the one training wrote
    _same(tmp_path / "kohya.safetensors", kohya)
    # the header still says what the file is for
    header = read_as_peft(tmp_path / "kohya-diffusers.safetensors")[3]
    assert header["lorabooth.family"] == FAMILIES[model]


def test_inspect_with_and_without_the_model(runs, capsys):
    model, run, _ = runs
    name = {"flux2": "FLUX.2 [klein]", "flux1": "FLUX.1"}[FAMILIES[model]]
    for file in (run / WEIGHT_NAME, run / KOHYA_WEIGHT_NAME):
        code, out, _ = _cli(capsys, "inspect", file, "--model", model)
        assert code == 0 and f"base architecture (guessed): {name}" in out
        assert f"ComfyUI ({model}): every key maps to a weight" in out
        code, out, _ = _cli(capsys, "inspect", file)  # the published model is 3072 wide
        assert code == 0 and "clients: not checked (its width 32 is not" in out


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_inspect_without_model_checks_against_the_published_transformer(model, tmp_path,
                                                                         capsys):
    """A LoRA of the published width is checked against FLUX.1 [dev]'s or
    FLUX.2 [klein] 4B's transformer (built on meta, no weights): blocks it
    has load; a block it does not have is reported, exit 2."""
    from lorabooth.formats.flux import to_bfl_kohya

    family = FAMILIES[model]
    g = torch.Generator().manual_seed(0)
    peft = {}
    for block in (0, 4):  # klein 4B has 5 double blocks, FLUX.1 [dev] 19
        for part in ("to_q", "to_k", "to_v", "add_q_proj", "to_add_out"):
            module = f"transformer.transformer_blocks.{block}.attn.{part}"
            peft[f"{module}.lora_A.weight"] = torch.randn(2, 3072, generator=g)
            peft[f"{module}.lora_B.weight"] = torch.randn(3072, 2, generator=g)
    kohya = tmp_path / "k.safetensors"
    save_file(to_bfl_kohya(family, peft, 2.0), kohya,
              metadata={"lorabooth.family": json.dumps(family)})
    published = {"flux1": "FLUX.1 [dev]", "flux2": "FLUX.2 [klein] 4B"}[family]
    code, out, _ = _cli(capsys, "inspect", kohya)
    assert code == 0 and f"ComfyUI ({published}): every key maps to a weight" in out
    beyond = {k.replace("double_blocks_4_", "double_blocks_30_"): v
              for k, v in load_file(kohya).items()}
    save_file(beyond, kohya, metadata={"lorabooth.family": json.dumps(family)})
    code, out, err = _cli(capsys, "inspect", kohya)
    assert code == 2 and "not loaded: lora_unet_double_blocks_30_img_attn_qkv" in out
    assert len(err) == 1 and "would not load completely" in err[0]


def test_families_do_not_mix(runs, trained_run, tmp_path, capsys):
    """A LoRA of one family with the other's model, or SD and FLUX LoRAs
    together: one line each, exit 2, nothing written."""
    model, run, _ = runs
    out = tmp_path / "out"
    out.mkdir()
    # the same tensors, recorded as the other FLUX family's
    other = tmp_path / "other.safetensors"
    save_file(load_file(run / WEIGHT_NAME), other,
              metadata={"lorabooth.family": json.dumps(FAMILIES[OTHER[model]])})
    cases = [
        (["inspect", run / KOHYA_WEIGHT_NAME, "--model", OTHER[model]], "check it against a "
         "model of its own family"),
        (["inspect", run / WEIGHT_NAME, "--model", "tiny"], "a Stable Diffusion 1.x/2.x model"),
        (["inspect", trained_run / WEIGHT_NAME, "--model", model], "is a Stable Diffusion"),
        (["merge", run, trained_run, "--out", out / "m.safetensors"],
         "LoRAs of different model families cannot be merged"),
        (["merge", run, other, "--out", out / "m.safetensors"],
         "LoRAs of different model families cannot be merged"),
        (["fuse", run, "--model", OTHER[model], "--out", out / "f"], "it fuses only into a FLUX"),
        (["fuse", run, "--model", "tiny", "--single-file", "--out", out / "f.safetensors"],
         "it fuses only into a FLUX"),
        (["fuse", trained_run, "--model", model, "--out", out / "g"],
         "fuses only into a Stable Diffusion"),
        (["fuse", run, "--text-scale", "0.5", "--out", out / "h"], "no text-encoder part")]
    for argv, needle in cases:
        code, _, err = _cli(capsys, *argv)
        assert code == 2 and len(err) == 1 and needle in err[0], (argv, err)
    assert not any(out.iterdir())


def _draw(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, height=32, width=32, num_inference_steps=3,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def _plain_pipeline(model):
    from diffusers import Flux2KleinPipeline, FluxPipeline

    return Flux2KleinPipeline if FAMILIES[model] == "flux2" else FluxPipeline


def _single_file_transformer(model, file, folder):
    """BFL's file back into a diffusers transformer: FLUX.2 through diffusers'
    own ``from_single_file`` with the local config; FLUX.1 through lorabooth's
    loader (diffusers' FLUX.1 converter splits `linear1` at FLUX.1 [dev]'s
    width, 3072, so it reads no smaller model)."""
    from diffusers import Flux2Transformer2DModel

    from lorabooth.core.fileio import load_json
    from lorabooth.models.flux_singlefile import load_bfl_transformer

    if FAMILIES[model] == "flux2":
        return Flux2Transformer2DModel.from_single_file(
            str(file), config=str(folder), subfolder="transformer", torch_dtype=torch.float32)
    return load_bfl_transformer(file, "flux1", load_json(folder / "transformer" / "config.json"))


def test_the_chain_convert_inspect_merge_fuse_load(runs, tmp_path, capsys):
    """A trained run through every file command, ending in plain diffusers:
    the fused folder and the fused single file draw what the merged LoRA
    at scale 1 draws in lorabooth's own pipeline."""
    from lorabooth.generation import load_pipeline
    from lorabooth.models.flux_singlefile import bfl_family

    model, a, b = runs
    kohya = tmp_path / "a-kohya.safetensors"
    assert _cli(capsys, "convert", a / WEIGHT_NAME, kohya, "--to", "kohya")[0] == 0
    assert _cli(capsys, "inspect", kohya, "--model", model)[0] == 0

    merged = tmp_path / "merged.safetensors"
    assert _cli(capsys, "merge", kohya, b, "--weights", "0.7,0.3", "--out", merged)[0] == 0
    merged_kohya = tmp_path / "merged-kohya.safetensors"  # rank 8: block-diagonal qkv of 24
    assert _cli(capsys, "convert", merged, merged_kohya, "--to", "kohya")[0] == 0
    for file in (merged, merged_kohya):
        code, out, _ = _cli(capsys, "inspect", file, "--model", model)
        assert code == 0 and "every key maps to a weight" in out
    _same(read_as_peft(merged_kohya)[0], read_as_peft(merged)[0])
    pa, pb, pm = (read_as_peft(p) for p in (a / WEIGHT_NAME, b / WEIGHT_NAME, merged))
    assert modules_of(pm[0]) == modules_of(pa[0])
    for module in modules_of(pm[0]):  # the merge is the weighted sum of the deltas, exactly
        want = 0.7 * delta(pa[0], module, pa[2]) + 0.3 * delta(pb[0], module, pb[2])
        torch.testing.assert_close(delta(pm[0], module, pm[2]), want, rtol=1e-5, atol=1e-7)

    folder, single = tmp_path / "fused", tmp_path / "fused.safetensors"
    assert _cli(capsys, "fuse", merged, "--out", folder)[0] == 0
    assert _cli(capsys, "fuse", merged, "--single-file", "--out", single)[0] == 0
    assert bfl_family(list(load_file(single))) == FAMILIES[model]

    lora_pipe, _ = load_pipeline(merged)
    with_lora = _draw(lora_pipe)
    plain = _plain_pipeline(model)
    from_folder = _draw(plain.from_pretrained(folder))
    from_file = _draw(plain.from_pretrained(
        folder, transformer=_single_file_transformer(model, single, folder)))
    lora_pipe.unload_lora_weights()
    base = _draw(lora_pipe)
    assert abs(with_lora - base).max() > 1e-2  # the LoRA changes the picture
    assert abs(from_folder - with_lora).max() < 1e-4
    assert abs(from_file - with_lora).max() < 1e-4


def test_fused_single_file_loads_as_lorabooth_model(runs, tmp_path, capsys, caplog):
    """`--model fused.safetensors --model-config FOLDER` (BFL's file with the
    VAE and text encoders from a folder) holds the fused transformer."""
    from lorabooth.models.loading import load_base

    model, run, _ = runs
    folder, single = tmp_path / "fused", tmp_path / "fused.safetensors"
    with caplog.at_level("INFO", logger="lorabooth"):
        assert _cli(capsys, "fuse", run, "--out", folder)[0] == 0
    # names the FLUX denoiser, and no text scale for a run with no text-encoder LoRA
    assert f"fused model (transformer scale 1) written to {folder}" in caplog.text
    assert _cli(capsys, "fuse", run, "--single-file", "--out", single)[0] == 0
    loaded = load_base(str(single), str(folder)).unet.state_dict()
    want = _plain_pipeline(model).from_pretrained(folder).transformer.state_dict()
    assert loaded.keys() == want.keys()
    for k in want:
        assert torch.equal(loaded[k], want[k]), k


# -- data-parallel: two CPU processes (gloo), as tests/test_dataparallel.py for SD

@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_two_processes_train_one_flux_batch(model, flux_photos, tmp_path):
    """Step 1's loss is the mean of rank 0's example (a 1-process run seeded
    0) and rank 1's (seeded 1): LoRA's B starts at zero, so step 1 does not
    depend on the LoRA's init (see test_dataparallel's docstring)."""
    from test_dataparallel import _env, _free_port

    out = tmp_path / "two"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "lorabooth",
            "train", "--model", model, "--instance-prompt", PROMPT, "--resolution", "32",
            "--seed", "0", "--instance-dir", str(flux_photos), "--steps", "2", "--lr", "0.01",
            "--batch-size", "1", "--output", str(out)]
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    firsts = []
    for seed in (0, 1):
        one = train(TrainConfig(model=model, instance_dir=str(flux_photos), instance_prompt=PROMPT,
                                steps=1, seed=seed, resolution=32, lr=1e-2,
                                output=str(tmp_path / f"rank{seed}")))
        firsts.append(json.loads((one / "metrics.jsonl").read_text().splitlines()[0])["loss"])
    assert len(two) == 2 and abs(firsts[0] - firsts[1]) > 1e-4
    assert two[0] == pytest.approx(sum(firsts) / 2, abs=1e-5)
    weights = load_file(out / WEIGHT_NAME)
    assert weights and all(k.startswith("transformer.") for k in weights)
    assert (out / KOHYA_WEIGHT_NAME).is_file()

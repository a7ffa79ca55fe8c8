"""Sampler options (eta, s_noise, churn, DPM++ SDE's r) through a GenerationRequest: checked against what the
sampler takes, applied exactly as a direct call of the sampler, left out they change nothing; recorded in the
PNG (A1111's "Eta", "Sigma churn"...) and replayed by `generate --from`; `generate` and `sample` flags."""

import functools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from nanodiffusion.cli import main
from nanodiffusion.diffusion.samplers import SAMPLERS, sampler_options
from nanodiffusion.errors import UserError
from nanodiffusion.images import read_png_text
from nanodiffusion.pipelines.ddpm import DDPMPipeline
from nanodiffusion.pipelines.metadata import PARAMETERS_KEY, SETTINGS_KEY, a1111_parameters
from nanodiffusion.pipelines.request import GenerationRequest
from fixtures import tiny_ours

RUN = dict(seed=3, num_steps=3, output_type="latent")
OPTIONS = [("euler_ancestral", {"eta": 0.5, "s_noise": 0.9}), ("ddim", {"eta": 0.7}),
           ("euler", {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 8.0, "s_noise": 1.1}),
           ("dpmpp_sde", {"eta": 0.3, "r": 0.3}), ("dpmpp_3m_sde", {"eta": 0.5}), ("tcd", {"eta": 0.6})]


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_ours()
    pipe.show_progress = False
    return pipe


@pytest.mark.parametrize("name, options", OPTIONS)
def test_options_act_exactly_as_a_direct_call_of_the_sampler(pipe, monkeypatch, name, options):
    given = pipe("a cat", sampler=name, sampler_options=options, **RUN).images
    plain = pipe("a cat", sampler=name, **RUN).images
    # the registry's function with the options bound: the pipeline then calls it without any
    bound = functools.partial(SAMPLERS[name].function, **options)
    monkeypatch.setitem(SAMPLERS, name, SAMPLERS[name]._replace(function=bound))
    direct = pipe("a cat", sampler=name, **RUN).images
    assert torch.equal(given, direct)
    assert not torch.allclose(given, plain, atol=1e-3)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_options_at_their_defaults_give_the_images_of_none(pipe, name):
    defaults = {key: value for key, value in sampler_options(name).items() if value != math.inf}
    settings = dict(RUN, num_steps=2)
    assert torch.equal(pipe("a cat", sampler=name, sampler_options=defaults, **settings).images,
                       pipe("a cat", sampler=name, **settings).images)


@pytest.mark.parametrize("options, message", [
    ({"eta": 0.5}, "sampler 'euler' takes no option eta; its options: s_churn, s_tmin, s_tmax, s_noise"),
    ({"s_tmax": math.inf}, "s_tmax must be a finite number.*leave it out for its default, inf"),
    ({"s_churn": float("nan")}, "s_churn must be a finite number"),
    ({"s_noise": True}, "s_noise must be a finite number, got True"),
    ({"s_churn": "1"}, "s_churn must be a finite number, got '1'"),
    ({"s_churn": -1.0}, "s_churn must be >= 0 for 'euler', got -1.0"),
    ([("eta", 1.0)], "sampler_options must map option names to values"),
])
def test_bad_options_are_user_errors_naming_them(options, message):
    with pytest.raises(UserError, match=message):
        GenerationRequest("a cat", sampler="euler", sampler_options=options)


def test_sampler_specific_limits_and_types():
    with pytest.raises(UserError, match="eta must be in \\[0, 1\\] for 'tcd', got 1.5"):
        GenerationRequest("a cat", sampler="TCDScheduler", sampler_options={"eta": 1.5})
    with pytest.raises(UserError, match="r must be in \\(0, 1\\]"):
        GenerationRequest("a cat", sampler="dpmpp_sde", sampler_options={"r": 0})
    with pytest.raises(UserError, match="order must be an integer, got 2.0"):
        GenerationRequest("a cat", sampler="unipc", sampler_options={"order": 2.0})
    with pytest.raises(UserError, match="variant must be a string"):
        GenerationRequest("a cat", sampler="unipc", sampler_options={"variant": 1})
    GenerationRequest("a cat", sampler="unipc", sampler_options={"order": 3, "variant": "bh1"})


def test_the_request_round_trips_through_json_and_names_the_options_as_a1111():
    request = GenerationRequest("a cat", seed=1, width=16, height=16, sampler="Euler",
                                sampler_options={"s_churn": 1.5, "s_tmin": 0.0, "s_noise": 1.003})
    assert GenerationRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request
    text = a1111_parameters(request, "tiny", None)
    assert "Sigma churn: 1.5, Sigma noise: 1.003, Version" in text and "Sigma tmin" not in text   # a default
    ddim = GenerationRequest("a cat", seed=1, width=16, height=16, sampler="ddim",
                             sampler_options={"eta": 0.5})
    assert "Eta DDIM: 0.5" in a1111_parameters(ddim, "tiny", None)
    ancestral = GenerationRequest("a cat", seed=1, width=16, height=16, sampler="euler_a",
                                  sampler_options={"eta": 0.5})
    assert ", Eta: 0.5," in a1111_parameters(ancestral, "tiny", None)
    assert "Eta" not in a1111_parameters(GenerationRequest("a cat", seed=1, width=16, height=16,
                                                           sampler="euler_a"), "tiny", None)


def _stored(path) -> dict:
    return json.loads(read_png_text(path)[SETTINGS_KEY])["request"]


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_flags_are_recorded_and_replayed(tmp_path, capsys):
    base = ["generate", "a red circle", "--steps", "3", "--seed", "4"]
    main([*base, "--sampler", "euler", "--s-churn", "2", "--s-tmin", "0.5", "--out", str(tmp_path / "a.png")])
    assert _stored(tmp_path / "a.png")["sampler_options"] == {"s_churn": 2.0, "s_tmin": 0.5}
    assert "Sigma churn: 2.0, Sigma tmin: 0.5" in read_png_text(tmp_path / "a.png")[PARAMETERS_KEY]
    main(["generate", "--from", str(tmp_path / "a.png"), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "again.png"))
    main([*base, "--sampler", "euler", "--out", str(tmp_path / "plain.png")])
    assert not np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "plain.png"))
    # a flag given with --from changes that option only
    main(["generate", "--from", str(tmp_path / "a.png"), "--s-churn", "1", "--out", str(tmp_path / "b.png")])
    assert _stored(tmp_path / "b.png")["sampler_options"] == {"s_churn": 1.0, "s_tmin": 0.5}


def test_generate_refuses_an_option_the_sampler_does_not_take(tmp_path, capsys):
    # the built-in model's default sampler is DPM++ 2M, which draws no fresh noise
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a red circle", "--eta", "0.5", "--out", str(tmp_path / "a.png")])
    assert exit_.value.code == 2
    assert "error: sampler 'dpmpp_2m' takes no option eta; its options: none" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_sample_flags_reach_the_sampler(tmp_path, capsys):
    args = ["sample", "-n", "2", "--steps", "3", "--sampler", "euler_ancestral", "--seed", "1"]
    main([*args, "--eta", "0.4", "--out", str(tmp_path / "a.png")])
    main([*args, "--out", str(tmp_path / "b.png")])
    assert not np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "b.png"))
    DDPMPipeline.from_pretrained().sample_grid(tmp_path / "direct.png", num_images=2,
                                               sampler="euler_ancestral", num_steps=3, seed=1,
                                               guidance_scale=2.0, eta=0.4, progress=False)
    assert np.array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "direct.png"))
    with pytest.raises(SystemExit):
        main([*args, "--s-churn", "1", "--out", str(tmp_path / "c.png")])
    assert "takes no option s_churn; its options: eta, s_noise" in capsys.readouterr().err

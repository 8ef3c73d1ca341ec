"""Settings sources, their order, the original servers' shapes, and clear errors."""

import json
import os

import pytest

from app.core.errors import ConfigError
from app.core.formats import TileFormat
from app.settings import (
    Settings,
    default_render_threads,
    load_settings,
    settings_from,
    with_render_threads,
)


@pytest.fixture
def slide(tmp_path):
    path = tmp_path / "a.svs"
    path.write_bytes(b"not really a slide; only existence is checked at load time")
    return path


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_defaults(tmp_path):
    s = load_settings(base_dir=tmp_path, environ={})
    assert (s.TileCachePath, s.EnableDiskCache) == ("./tile_cache", True)
    assert (s.DeepZoom.TileSize, s.DeepZoom.Overlap, s.DeepZoom.LimitBounds) == (254, 1, True)
    tf = s.TileFormat
    assert (tf.Default, tf.LosslessFormat, tf.LosslessLevelCount) == (
        TileFormat.JPEG, TileFormat.PNG, 1)
    assert (tf.JpegQuality, tf.WebpQuality, tf.AllowFormatOverride) == (90, 90, True)
    assert s.Images == [] and s.Image.Path is None


def test_source_order(tmp_path, slide):
    write(tmp_path / "appsettings.json", {"TileFormat": {"JpegQuality": 50, "WebpQuality": 51},
                                          "DeepZoom": {"TileSize": 510, "Overlap": 2}})
    write(tmp_path / "config" / "appsettings.Staging.json",
          {"TileFormat": {"JpegQuality": 60}, "DeepZoom": {"Overlap": 3}})
    extra = write(tmp_path / "extra.json", {"TileFormat": {"JpegQuality": 70},
                                            "DeepZoom": {"LimitBounds": False}})
    environ = {"TILESERVER_ENVIRONMENT": "Staging", "TileFormat__JpegQuality": "80",
               "DEEPZOOM__TILESIZE": "256"}
    s = load_settings(base_dir=tmp_path, environ=environ, config_file=extra,
                      overrides=["TileFormat:JpegQuality=95"])
    assert s.TileFormat.JpegQuality == 95           # command line beats everything
    assert s.DeepZoom.TileSize == 256               # environment (case-insensitive) beats files
    assert s.DeepZoom.LimitBounds is False          # --config beats appsettings
    assert s.DeepZoom.Overlap == 3                  # environment overlay beats appsettings
    assert s.TileFormat.WebpQuality == 51           # untouched keys survive the merge
    without_env = load_settings(base_dir=tmp_path, environ={"TILESERVER_ENVIRONMENT": "Other"})
    assert (without_env.TileFormat.JpegQuality, without_env.DeepZoom.Overlap) == (50, 2)


def test_lists_merge_by_index(tmp_path, slide):
    other = tmp_path / "b.svs"
    other.write_bytes(b"x")
    write(tmp_path / "appsettings.json", {"Images": [{"Name": "a", "Path": str(slide)},
                                                     {"Name": "b", "Path": str(slide)}]})
    s = load_settings(base_dir=tmp_path, environ={"Images__1__Path": str(other)},
                      overrides=["Images:2:Name=c", f"Images:2:Path={other}"])
    assert [(i.Name, i.Path) for i in s.Images] == [
        ("a", str(slide)), ("b", str(other)), ("c", str(other))]


def test_environment_only_images(tmp_path, slide):
    s = load_settings(base_dir=tmp_path, environ={
        "Images__0__Name": "x", "Images__0__Path": str(slide), "Image__Path": str(slide)})
    assert [(i.Name, i.Path) for i in s.Images] == [("x", str(slide))]
    assert s.Image.Path == str(slide)


def test_single_slide_server_shape(tmp_path, slide):
    """appsettings.json as OpenSlideSharp's SingleSlideServer writes it, unchanged."""
    write(tmp_path / "appsettings.json", {
        "Logging": {"LogLevel": {"Default": "Information"}}, "AllowedHosts": "*",
        "Image": {"Path": str(slide), "TileCachePath": "./single_cache",
                  "EnableDiskCache": False,
                  "TileFormat": {"Default": "jpeg", "LosslessFormat": "png",
                                 "LosslessLevelCount": 2, "JpegQuality": 85}}})
    s = load_settings(base_dir=tmp_path, environ={})
    assert s.Image.Path == str(slide)
    assert (s.TileCachePath, s.EnableDiskCache) == ("./single_cache", False)
    assert (s.TileFormat.LosslessLevelCount, s.TileFormat.JpegQuality) == (2, 85)


@pytest.mark.parametrize(("tile_format", "message"), [
    ({"JpegQuality": 0}, "Image:TileFormat:JpegQuality = 0: Input should be greater than or "
                         "equal to 1"),
    ({"JpegQualty": 80}, "Image:TileFormat:JpegQualty ({base}/appsettings.json) is not a "
                         "setting; did you mean Image:TileFormat:JpegQuality?"),
])
def test_single_slide_server_shape_errors_are_named_once(tmp_path, slide, tile_format, message):
    write(tmp_path / "appsettings.json", {"Image": {"Path": str(slide),
                                                    "TileFormat": tile_format}})
    with pytest.raises(ConfigError) as info:
        load_settings(base_dir=tmp_path, environ={})
    assert info.value.detail == "invalid configuration: " + message.format(base=tmp_path)


def test_multi_slide_server_shape(tmp_path, slide):
    """appsettings.json as OpenSlideSharp's MultiSlideServer writes it, unchanged."""
    write(tmp_path / "appsettings.json", {
        "Logging": {"LogLevel": {"Default": "Information"}}, "AllowedHosts": "*",
        "TileCachePath": "./multi_cache", "EnableDiskCache": True,
        "TileFormat": {"Default": "jpg", "LosslessFormat": "png", "LosslessLevelCount": -1},
        "Images": [{"Name": "test1", "Path": str(slide)}, {"Name": "test2", "Path": str(slide)}]})
    s = load_settings(base_dir=tmp_path, environ={})
    assert [i.Name for i in s.Images] == ["test1", "test2"]
    assert s.TileCachePath == "./multi_cache"
    assert (s.TileFormat.Default, s.TileFormat.LosslessLevelCount) == (TileFormat.JPEG, -1)


@pytest.mark.parametrize(("overrides", "message"), [
    (["TileFormat:Default=gif"], "TileFormat:Default = 'gif'"),
    (["TileFormat:JpegQuality=150"], "TileFormat:JpegQuality = '150'"),
    (["TileFormat:WebpQuality=0"], "TileFormat:WebpQuality = '0'"),
    (["TileFormat:LosslessFormat=jpeg"], "LosslessFormat 'jpeg' cannot encode losslessly"),
    (["Image:Path=/nowhere/slide.svs"], "Image:Path = '/nowhere/slide.svs': slide file not found"),
    (["Images:0:Name=a", "Images:0:Path=/nowhere/b.svs"],
     "Images:0:Path = '/nowhere/b.svs': slide file not found"),
    (["Images:0:Name=../x", "Images:0:Path=/x"], "not a valid slide name"),
    (["SlideDirectory=/nowhere"], "SlideDirectory = '/nowhere': folder not found"),
    (["DeepZoom:TileSize=abc"], "DeepZoom:TileSize = 'abc'"),
    (["TileFormat"], "expected Section:Key=value"),
])
def test_bad_configuration_names_key_and_value(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_settings(base_dir=tmp_path, environ={}, overrides=overrides)
    assert message in info.value.detail


def test_malformed_json_is_named(tmp_path):
    (tmp_path / "appsettings.json").write_text("{not json")
    with pytest.raises(ConfigError, match="appsettings.json: not valid JSON"):
        load_settings(base_dir=tmp_path, environ={})


@pytest.mark.e2e  # the CLI as a process
@pytest.mark.parametrize(("item", "message"), [
    ("TileFormat:JpegQuality=0", "TileFormat:JpegQuality = '0'"),
    ("TileFormat:EnforceLosless=true", "TileFormat:EnforceLosless (command line) is not a "
                                       "setting; did you mean TileFormat:EnforceLossless?"),
])
def test_cli_reports_config_error_and_exits(tmp_path, item, message):
    import subprocess
    import sys
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", item],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1  # one clear line, no traceback


@pytest.mark.parametrize(("source", "message"), [
    ("file", "TileFormat:EnforceLosless ({base}/appsettings.json) is not a setting; "
             "did you mean TileFormat:EnforceLossless?"),
    ("config", "Images:1:Nmae ({base}/extra.json) is not a setting; did you mean Images:1:Name?"),
    ("environment", "Audit:Enable (environment variable Audit__Enable) is not a setting; "
                    "did you mean Audit:Enabled?"),
    ("command line", "DeepZoom:TileSise (command line) is not a setting; "
                     "did you mean DeepZoom:TileSize?"),
    ("unknown section", "Tiles (command line) is not a setting"),
])
def test_unknown_key_names_its_source_and_the_nearest_setting(tmp_path, slide, source,
                                                              message):
    kwargs = {"environ": {}, "base_dir": tmp_path}
    if source == "file":
        write(tmp_path / "appsettings.json", {"TileFormat": {"EnforceLosless": True}})
    elif source == "config":
        kwargs["config_file"] = write(tmp_path / "extra.json", {"Images": [
            {"Name": "a", "Path": str(slide)}, {"Nmae": "b", "Path": str(slide)}]})
    elif source == "environment":
        kwargs["environ"] = {"Audit__Enable": "true"}
    elif source == "command line":
        kwargs["overrides"] = ["DeepZoom:TileSise=256"]
    else:
        kwargs["overrides"] = ["Tiles:Size=256"]
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)
    assert info.value.detail == "invalid configuration: " + message.format(base=tmp_path)


def test_host_sections_are_accepted_from_every_source(tmp_path):
    write(tmp_path / "appsettings.json", {
        "Logging": {"LogLevel": {"Default": "Information", "Microsoft.AspNetCore": "Warning"}},
        "AllowedHosts": "*", "Kestrel": {"Endpoints": {"Http": {"Url": "http://0.0.0.0:5000"}}},
        "ConnectionStrings": {"Default": "Server=x"}, "TileCachePath": "./c"})
    s = load_settings(base_dir=tmp_path, environ={"Logging__LogLevel__Default": "Debug",
                                                  "ALLOWEDHOSTS": "example.org"},
                      overrides=["Kestrel:Limits:MaxRequestBodySize=10"])
    assert s.TileCachePath == "./c"


def test_environment_variables_count_only_under_a_known_section(tmp_path):
    s = load_settings(base_dir=tmp_path, environ={
        "Tiles__Size": "1", "PATH": "/usr/bin", "HOME": "/root", "deepzoom__tilesize": "510"})
    assert s.DeepZoom.TileSize == 510
    with pytest.raises(ConfigError, match=r"DeepZoom:Size \(environment variable "
                                          r"DeepZoom__Size\) is not a setting"):
        load_settings(base_dir=tmp_path, environ={"DeepZoom__Size": "510"})


def test_settings_are_frozen_and_variants_are_copies(tmp_path, slide):
    from pydantic import ValidationError

    s = load_settings(base_dir=tmp_path, environ={})
    with pytest.raises(ValidationError, match="frozen"):
        s.Image.Path = str(slide)
    with pytest.raises(ValidationError, match="frozen"):
        s.TileCachePath = "/elsewhere"
    variant = s.model_copy(update={"Image": s.Image.model_copy(update={"Path": str(slide)})})
    assert (variant.Image.Path, s.Image.Path) == (str(slide), None)


def test_changed_settings_lists_what_differs_from_the_defaults(tmp_path, slide):
    from app.settings import changed_settings, settings_from

    write(tmp_path / "appsettings.json", {
        "Image": {"Path": str(slide), "TileFormat": {"JpegQuality": 80}},
        "Privacy": {"HideProperties": ["aperio.User"]}, "DeepZoom": {"ColorMode": "perceptual",
                                                                     "TileSize": 254}})
    s = load_settings(base_dir=tmp_path, environ={"Audit__Enabled": "true"})
    assert changed_settings(s) == [
        f"Image:Path = {slide}", "Image:TileFormat:JpegQuality = 80",
        "DeepZoom:ColorMode = perceptual", "TileFormat:JpegQuality = 80",
        'Privacy:HideProperties = ["aperio.User"]', "Audit:Enabled = true"]
    assert changed_settings(settings_from({})) == []
    assert changed_settings(settings_from(s.model_dump_json())) == changed_settings(s)


def test_render_threads_are_two_per_core_shared_by_the_workers(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert [default_render_threads(w) for w in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert [default_render_threads(w) for w in (1, 2, 4, 16)] == [32, 16, 8, 2]
    resolved = with_render_threads(Settings(), 4)
    assert resolved.Server.RenderThreads == 8 and resolved.Server.RenderNice == 10
    given = settings_from({"Server": {"RenderThreads": 3}})
    assert with_render_threads(given, 4) is given
    monkeypatch.setattr(os, "cpu_count", lambda: 192)  # within what workers accept
    assert default_render_threads(1) == 256
    sent = with_render_threads(Settings(), 1).model_dump_json()  # as the workers receive it
    assert settings_from(sent).Server.RenderThreads == 256

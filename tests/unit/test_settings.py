"""Settings sources, their order, the original servers' shapes, and clear errors."""

import json

import pytest

from app.core.errors import ConfigError
from app.core.formats import TileFormat
from app.settings import load_settings


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
def test_cli_reports_config_error_and_exits(tmp_path):
    import subprocess
    import sys
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "TileFormat:JpegQuality=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "TileFormat:JpegQuality = '0'" in result.stderr
    assert result.stderr.count("\n") == 1  # one clear line, no traceback

"""Every setting is in appsettings.json with its default and in docs/configuration.md's table."""

import json

from pydantic import BaseModel

from app.settings import Settings
from tests.conftest import ROOT

SHAPES_ONLY = {"Image", "Images"}  # the original servers' shapes, documented in their own rows


def leaves(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from leaves(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info.get_default(call_default_factory=True)


def test_every_setting_is_in_appsettings_json_and_docs_configuration_md():
    shipped = json.loads((ROOT / "appsettings.json").read_text())
    documented = (ROOT / "docs" / "configuration.md").read_text()
    keys = [(k, v) for k, v in leaves(Settings) if k.split(".")[0] not in SHAPES_ONLY]
    assert len(keys) > 20
    for key, default in keys:
        node = shipped
        for part in key.split("."):
            assert part in node, f"{key} is missing from appsettings.json"
            node = node[part]
        assert node == (default.value if hasattr(default, "value") else default), key
        assert f"| `{key}` |" in documented, f"{key} is missing from docs/configuration.md"

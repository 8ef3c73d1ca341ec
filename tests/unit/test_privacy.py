"""The PHI switch's rules (app.core.privacy) on real slide files: Aperio descriptions redacted by
their ``Key = Value`` structure, the identity and fingerprints, and hash slide names."""

import hashlib
import shutil

import openslide

from app.batch.cli import slide_names
from app.core.names import is_valid_name
from app.core.privacy import Privacy
from app.core.slides import SlideEntry, build_catalogue, opaque_slide_name, slide_identity
from app.settings import PrivacySettings, settings_from

DESCRIPTIONS = ("openslide.comment", "tiff.ImageDescription")


def test_short_withheld_values_leave_the_aperio_description_by_their_key(fixtures):
    """``AppMag = 20`` and ``Filtered = 5`` are too short to chase by value; their items go by
    key, the rest of the description stays, byte for byte."""
    props = dict(openslide.open_slide(fixtures / "small.svs").properties)
    assert "|AppMag = 20|" in props["openslide.comment"]
    privacy = Privacy(PrivacySettings(HideProperties=["aperio.appmag", "*.Filtered"]))
    shown = privacy.properties(props)
    assert "aperio.AppMag" not in shown and "aperio.Filtered" not in shown
    for key in DESCRIPTIONS:
        assert shown[key] == (props[key].replace("|AppMag = 20", "")
                              .replace("|Filtered = 5", ""))
        items = [item.partition("=")[0].strip() for item in shown[key].split("|")[1:]]
        assert "AppMag" not in items and "Filtered" not in items and "ScanScope ID" in items
    assert shown["aperio.StripeWidth"] == "2040"  # other properties untouched
    # a long withheld value still withholds every property holding it, as before
    dated = Privacy(PrivacySettings(HideProperties=["aperio.Date"])).properties(props)
    assert not any(key in dated for key in DESCRIPTIONS)
    # no pattern, nothing redacted
    assert Privacy(PrivacySettings()).properties(props) == props


def test_identity_and_fingerprints_follow_the_withheld_properties():
    identity = slide_identity("ab" * 32, 1234, 1_700_000_000_123_456_789)
    open_privacy = Privacy(PrivacySettings())
    assert open_privacy.identity(identity) == identity and open_privacy.shows_fingerprints
    dates = Privacy(PrivacySettings(HideProperties=["aperio.Date"]))
    opaque = dates.identity(identity)
    assert opaque == "opaque:" + hashlib.sha256(identity.encode()).hexdigest()[:32]
    assert "1234" not in opaque and "ab" * 4 not in opaque
    assert dates.identity(slide_identity("ab" * 32, 1234, 1)) != opaque  # still changes
    assert dates.shows_fingerprints  # the quickhash itself is visible
    assert not Privacy(PrivacySettings(HideProperties=["openslide.*"])).shows_fingerprints


def test_hash_names_are_stable_opaque_and_valid(fixtures, tmp_path):
    """The same file anywhere, under any name and time, has the same name; another file
    another; a file without a quickhash (an image OpenSlide hands to Pillow, a file nothing
    opens) is named from its bytes."""
    folder = tmp_path / "slides"
    folder.mkdir()
    a = shutil.copy(fixtures / "small.svs", folder / "Smith, John 1234.svs")
    b = shutil.copy(fixtures / "small.svs", tmp_path / "copy.svs")
    b.touch()
    name = opaque_slide_name(a)
    assert name == opaque_slide_name(b) and len(name) == 24 and is_valid_name(name)
    assert set(name) <= set("0123456789abcdef")
    assert "quickhash" not in name and name not in dict(
        openslide.open_slide(a).properties)["openslide.quickhash-1"]
    others = {opaque_slide_name(fixtures / f) for f in
              ("boxes.tiff", "boxes.png", "unopenable.tiff", "unreadable.svs")}
    assert len(others | {name}) == 5
    png = tmp_path / "boxes.png"
    shutil.copy(fixtures / "boxes.png", png)
    png.write_bytes(png.read_bytes() + b"\0")  # other bytes: another name
    assert opaque_slide_name(png) != opaque_slide_name(fixtures / "boxes.png")

    shutil.copy(fixtures / "small.svs", folder / "second copy.svs")
    settings = settings_from({"SlideDirectory": str(folder), "Privacy": {"SlideNames": "hash"},
                              "Images": [{"Name": "kept", "Path": str(b)}]})
    catalogue = build_catalogue(settings)
    assert list(catalogue) == ["kept", name]  # one entry per slide, configured names kept
    assert catalogue[name].path.name == "Smith, John 1234.svs"
    # a file given to the pregenerate/export commands gets the server's name for it
    assert slide_names({}, [str(b)], settings) == [name]
    assert slide_names({}, [str(b)], settings_from({})) == ["copy"]
    assert build_catalogue(settings_from({"SlideDirectory": str(folder)})) == {
        "Smith, John 1234": SlideEntry("Smith, John 1234", a),
        "second copy": SlideEntry("second copy", folder / "second copy.svs")}

"""Discovery through entry points, with real (throw-away) distributions written to a temp site dir."""

import textwrap

import pytest
import skyrl_backends as sb
from skyrl_backends import BackendLoadError, BackendNotFoundError, EngineVersionError, PluginAPIVersionError
from skyrl_backends.discovery import discover_backends, get_backend, refresh_backends

GOOD_PLUGIN = """
from skyrl_backends import hookimpl
from skyrl_backends.types import BackendInfo
from skyrl_backends.capabilities import Capabilities

@hookimpl
def skyrl_backends_backend_info():
    return BackendInfo(name="{name}", engine="{engine}", supported_versions="{supported}")

@hookimpl
def skyrl_backends_capabilities(config):
    return Capabilities(lora=True)

@hookimpl
def skyrl_backends_create_engine(config):
    raise RuntimeError("not needed by these tests")
"""


def make_dist(site, dist, module, source, entry_points, version="1.0"):
    """Write an installed distribution (dist-info with entry points) and its module into ``site``."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[skyrl_backends]\n{lines}\n")
    if module:
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    refresh_backends()  # discovery reads entry points once per process: as after a pip install, look again


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    # An "engine" distribution at a known version, for the version checks.
    make_dist(site, "fake-engine", None, "", {}, version="0.5.0")
    yield site
    refresh_backends()  # forget the throw-away plugins


def test_broken_plugin_is_reported_and_others_still_load(site):
    make_dist(site, "skyrl-backend-good", "good_plugin",
              GOOD_PLUGIN.format(name="good", engine="fake-engine", supported=">=0.5"), {"good": "good_plugin"})
    make_dist(site, "skyrl-backend-broken", "broken_plugin", "import engine_that_does_not_exist\n",
              {"broken": "broken_plugin"})
    backends = discover_backends()
    assert backends["good"].status == "ok"
    assert backends["good"].engine_version == "0.5.0"
    broken = backends["broken"]
    assert broken.status == "error"
    assert broken.distribution == "skyrl-backend-broken"
    assert "engine_that_does_not_exist" in broken.reason
    with pytest.raises(BackendLoadError) as info:
        get_backend("broken")
    assert "skyrl-backend-broken" in str(info.value) and "engine_that_does_not_exist" in str(info.value)
    assert get_backend("good").name == "good"


@pytest.mark.parametrize("raising", ["import sys\nsys.exit('no GPU here')\n", "raise KeyboardInterrupt\n",
                                     "raise SystemExit(3)\n"])
def test_a_plugin_that_exits_or_interrupts_at_import_is_broken_not_fatal(site, raising):
    make_dist(site, "skyrl-backend-good", "good_plugin",
              GOOD_PLUGIN.format(name="good", engine="fake-engine", supported=">=0.5"), {"good": "good_plugin"})
    make_dist(site, "skyrl-backend-exits", "exiting_plugin", raising, {"exits": "exiting_plugin"})
    backends = discover_backends()  # before: SystemExit / KeyboardInterrupt escaped and hid every backend
    assert backends["good"].status == "ok"
    exits = backends["exits"]
    assert exits.status == "error" and exits.distribution == "skyrl-backend-exits"
    assert "while loading the plugin" in exits.reason
    with pytest.raises(BackendLoadError, match="skyrl-backend-exits"):
        get_backend("exits")


def test_a_plugin_hook_that_exits_is_broken_not_fatal(site):
    source = GOOD_PLUGIN.format(name="quits", engine="fake-engine", supported=">=0.5").replace(
        'return BackendInfo(name="quits"', 'raise SystemExit(1)\n    return BackendInfo(name="quits"')
    make_dist(site, "skyrl-backend-quits", "quitting_plugin", source, {"quits": "quitting_plugin"})
    assert discover_backends()["quits"].status == "error"


def test_unknown_backend_close_to_a_published_one_names_that_package(site):
    make_dist(site, "skyrl-backend-good", "good_plugin2",
              GOOD_PLUGIN.format(name="good", engine="fake-engine", supported=""), {"good": "good_plugin2"})
    with pytest.raises(BackendNotFoundError) as info:
        sb.create_engine("sglangg", model="/nowhere")
    message = str(info.value)
    assert "Did you mean 'sglang'?" in message
    assert "pip install 'skyrl-backend-sglang[gpu]'" in message
    assert "skyrl-backend-sglangg" not in message  # no package named after the typo
    assert "good" in message.split("Installed backends: ", 1)[1]


def test_typo_of_an_installed_backend_suggests_it_and_no_package(site):
    make_dist(site, "skyrl-backend-goodness", "goodness_plugin",
              GOOD_PLUGIN.format(name="goodness", engine="fake-engine", supported=""), {"goodness": "goodness_plugin"})
    with pytest.raises(BackendNotFoundError) as info:
        get_backend("goodnes")
    message = str(info.value)
    assert "Did you mean 'goodness'?" in message
    assert "pip install" not in message


def test_typo_of_the_reference_backend_names_the_real_backend(site):
    # Installed (transformers environment) or not (core environment), the hint is the real name.
    with pytest.raises(BackendNotFoundError) as info:
        get_backend("transformer")
    message = str(info.value)
    assert "Did you mean 'transformers'?" in message
    assert "skyrl-backend-transformer " not in message and "skyrl-backend-transformer`" not in message


def test_unknown_backend_with_no_close_name_suggests_no_package(site):
    with pytest.raises(BackendNotFoundError) as info:
        get_backend("nosuchengine")
    message = str(info.value)
    assert "No published backend has that name (published: sglang, transformers, vllm)" in message
    assert "pip install" not in message


def test_published_backend_not_installed_names_its_install_command(site, monkeypatch):
    monkeypatch.setenv("SKYRL_BACKENDS_DISABLE", "")
    with pytest.raises(BackendNotFoundError, match=r"Install it with `pip install 'skyrl-backend-vllm\[gpu\]'`"):
        # Only where the vLLM plugin is absent (every environment but .venv/vllm).
        if "vllm" in discover_backends():
            pytest.skip("the vllm plugin is installed here")
        get_backend("vllm")


def test_engine_version_out_of_range_is_skipped_with_range_and_install_command(site):
    make_dist(site, "skyrl-backend-old", "old_plugin",
              GOOD_PLUGIN.format(name="old", engine="fake-engine", supported=">=0.6,<0.7"), {"old": "old_plugin"})
    backend = discover_backends()["old"]
    assert backend.status == "skipped"
    assert backend.reason == ("Backend 'old' supports fake-engine >=0.6,<0.7, but version 0.5.0 is installed. "
                              "Install a supported version: `pip install 'fake-engine>=0.6,<0.7'`.")
    with pytest.raises(EngineVersionError, match="supports fake-engine >=0.6,<0.7, but version 0.5.0 is installed"):
        get_backend("old")


def test_engine_not_installed_is_skipped(site):
    make_dist(site, "skyrl-backend-missing", "missing_plugin",
              GOOD_PLUGIN.format(name="missing", engine="no-such-engine", supported=""),
              {"missing": "missing_plugin"})
    backend = discover_backends()["missing"]
    assert backend.status == "skipped"
    assert "no-such-engine (any version), but it is not installed" in backend.reason
    with pytest.raises(EngineVersionError, match="it is not installed"):
        get_backend("missing")


def test_skip_names_the_plugins_own_install_command(site):
    source = GOOD_PLUGIN.format(name="hinted", engine="fake-engine", supported=">=9").replace(
        'supported_versions=">=9")', 'supported_versions=">=9", install_hint="pip install \'hinted[engine]\'")')
    make_dist(site, "skyrl-backend-hinted", "hinted_plugin", source, {"hinted": "hinted_plugin"})
    backend = discover_backends()["hinted"]
    assert backend.status == "skipped"
    assert "supports fake-engine >=9" in backend.reason
    assert backend.reason.endswith("`pip install 'hinted[engine]'`.")


@pytest.mark.parametrize(("declared", "fix"), [
    ("(2,)", "upgrade skyrl-backends"),
    ("(0,)", "upgrade skyrl-backend-api to a release for plugin API 1"),
])
def test_plugin_for_another_plugin_api_version_is_skipped_with_reason(site, declared, fix):
    source = GOOD_PLUGIN.format(name="api", engine="fake-engine", supported="").replace(
        'supported_versions="")', f'supported_versions="", plugin_api_versions={declared})')
    assert "plugin_api_versions" in source
    module = f"api_plugin_{declared.strip('(,)')}"  # a module of its own per case (imports are cached)
    make_dist(site, "skyrl-backend-api", module, source, {"api": module})
    backend = discover_backends()["api"]
    assert backend.status == "skipped"
    version = declared.strip("(,)")
    assert f"was written for plugin API version {version}, but skyrl-backends" in backend.reason
    assert f"provides version {sb.PLUGIN_API_VERSION}" in backend.reason and fix in backend.reason
    with pytest.raises(PluginAPIVersionError, match=fix):
        get_backend("api")


def test_plugin_listing_the_current_api_version_among_others_loads(site):
    source = GOOD_PLUGIN.format(name="multi", engine="fake-engine", supported="").replace(
        'supported_versions="")', 'supported_versions="", plugin_api_versions=(1, 2))')
    make_dist(site, "skyrl-backend-multi", "multi_plugin", source, {"multi": "multi_plugin"})
    assert discover_backends()["multi"].status == "ok"


def test_misspelled_hook_is_an_error_naming_the_plugin(site):
    source = GOOD_PLUGIN.format(name="typo", engine="fake-engine", supported="") + textwrap.dedent("""
        @hookimpl
        def skyrl_backends_genrate(request):
            pass
    """)
    make_dist(site, "skyrl-backend-typo", "typo_plugin", source, {"typo": "typo_plugin"})
    backend = discover_backends()["typo"]
    assert backend.status == "error"
    assert "typo" in backend.reason and "skyrl_backends_genrate" in backend.reason


def test_argument_the_spec_lacks_is_an_error_naming_the_plugin(site):
    source = GOOD_PLUGIN.format(name="extra", engine="fake-engine", supported="").replace(
        "def skyrl_backends_capabilities(config):", "def skyrl_backends_capabilities(config, gpu_count):")
    make_dist(site, "skyrl-backend-extra", "extra_plugin", source, {"extra": "extra_plugin"})
    backend = discover_backends()["extra"]
    assert backend.status == "error"
    assert "gpu_count" in backend.reason and "extra" in backend.reason


def test_entry_point_name_must_match_the_plugin(site):
    make_dist(site, "skyrl-backend-liar", "liar_plugin",
              GOOD_PLUGIN.format(name="truth", engine="fake-engine", supported=""), {"liar": "liar_plugin"})
    backend = discover_backends()["liar"]
    assert backend.status == "error"
    assert "calls itself 'truth'" in backend.reason


def test_disabled_backend_is_listed_but_not_loaded(site, monkeypatch):
    make_dist(site, "skyrl-backend-off", "off_plugin", "raise SystemExit('must not be imported')\n",
              {"off": "off_plugin"})
    monkeypatch.setenv("SKYRL_BACKENDS_DISABLE", "off")
    backend = discover_backends()["off"]
    assert backend.status == "disabled"
    with pytest.raises(BackendLoadError, match="disabled by SKYRL_BACKENDS_DISABLE"):
        get_backend("off")


def test_discovery_does_not_import_the_engine(site):
    import sys

    make_dist(site, "skyrl-backend-lazy", "lazy_plugin",
              GOOD_PLUGIN.format(name="lazy", engine="fake-engine", supported="") +
              "\ndef _later():\n    import lazy_engine_module\n", {"lazy": "lazy_plugin"})
    assert discover_backends()["lazy"].status == "ok"
    assert "lazy_engine_module" not in sys.modules


def test_plugins_command_lists_status_capabilities_and_errors(site, capsys):
    from skyrl_backends.cli import main

    make_dist(site, "skyrl-backend-good", "good_plugin3",
              GOOD_PLUGIN.format(name="good", engine="fake-engine", supported=">=0.5"), {"good": "good_plugin3"})
    make_dist(site, "skyrl-backend-broken", "broken_plugin2", "raise ImportError('boom')\n",
              {"broken": "broken_plugin2"})
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "good: ok" in out and "skyrl-backend-good 1.0" in out and "fake-engine 0.5.0" in out
    assert "capabilities: lora" in out
    assert "broken: error" in out and "boom" in out

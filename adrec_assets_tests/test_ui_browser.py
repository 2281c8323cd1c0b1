"""The Dagster UI end to end in a real browser: ``dagster dev`` on 127.0.0.1 with a temporary
instance, Debian's Chromium driven headless by Playwright (never a downloaded browser).

A person's path: open the ``adrec`` asset group's lineage graph, see the pipeline assets
and their edges, "Materialize all…", pick the ``synthetic`` partition, launch, follow the run
to Success. Screenshots land in ``test-artifacts/ui/`` (printed by the test)."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from adrec_assets.snapshots import SnapshotStore
from adrec_assets_tests.service_helpers import (
    ARTIFACT_ASSETS,
    ARTIFACTS_ROOT,
    BIN_DIR,
    CHROMIUM_ARGS,
    PIPELINE_ASSETS,
    PIPELINE_EDGES,
    REPO_ROOT,
    DagsterDev,
    chromium_executable,
    dagster_dev,
    pipeline_env,
    tail,
)

pytestmark = pytest.mark.slow

playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="playwright (PyPI, in the `dev` extra) is not installed: `make setup`"
)

CODE_LOCATION = "adrec_assets.definitions"
GROUP = "adrec"
SHOTS = ARTIFACTS_ROOT / "ui"
UI_TIMEOUT_MS = 120_000  # one UI step (page load, GraphQL answer) on a busy 2-core machine
RUN_TIMEOUT_S = 1200  # bounded; ~1 min on 2 idle cores (the run queue, then an in-process run), far more on a busy box

# The graph is SVG: each asset node is a <foreignObject> whose title carries data-tooltip=<name>,
# each lineage edge a <path> with an arrow marker from a node's right side to another's left.
GRAPH_JS = """() => {
  const nodes = [...document.querySelectorAll('foreignObject')].map(fo => {
    const title = fo.querySelector('[data-tooltip]');
    return {name: title ? title.getAttribute('data-tooltip') : null,
            x: +fo.getAttribute('x'), y: +fo.getAttribute('y'),
            w: +fo.getAttribute('width'), h: +fo.getAttribute('height')};
  }).filter(n => n.name);
  const edges = [...document.querySelectorAll('svg path[marker-end]')]
    .filter(p => (p.getAttribute('stroke') || '').includes('lineage-edge'))
    .map(p => p.getAttribute('d'));
  return {nodes, edges};
}"""


def graph_edges(nodes: list[dict], paths: list[str], tolerance: float = 15.0) -> set[tuple[str, str]]:
    """(upstream, downstream) for each rendered edge path: its start must sit on the middle of
    a node's right side and its end (the arrow) on the middle of another node's left side.
    Edges to assets outside the group (drawn as links, not nodes) come back with ``"?"``."""

    def nearest(x: float, y: float, side: str) -> str:
        best, best_d = "?", tolerance
        for n in nodes:
            nx = n["x"] + n["w"] if side == "right" else n["x"]
            d = abs(nx - x) + abs(n["y"] + n["h"] / 2 - y)
            if d < best_d:
                best, best_d = n["name"], d
        return best

    edges = set()
    for d in paths:
        numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", d)]
        assert len(numbers) >= 4, f"unexpected edge path {d!r}"
        edges.add((nearest(numbers[0], numbers[1], "right"), nearest(numbers[-2], numbers[-1], "left")))
    return edges


def test_expected_lineage_matches_code() -> None:
    """The lineage the browser test looks for is the code's lineage (eleven assets, twenty-five edges)."""
    from adrec_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    code_edges = {
        (parent.to_user_string(), key.to_user_string())
        for key in graph.get_all_asset_keys()
        if key.to_user_string() in PIPELINE_ASSETS
        for parent in graph.get(key).parent_keys
    }
    assert code_edges == set(PIPELINE_EDGES)
    group = {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).group_name == GROUP}
    assert group == set(PIPELINE_ASSETS)


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory) -> Iterator[tuple[DagsterDev, Path, Path]]:
    """``dagster dev`` on a free loopback port with a temporary instance that knows ``synthetic``."""
    root = tmp_path_factory.mktemp("ui")
    home, artifacts, sources = root / "dagster_home", root / "artifacts", root / "sources"
    for folder in (home, artifacts, sources):
        folder.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = pipeline_env(home, artifacts, sources, ADREC_EXECUTOR="in_process")
    subprocess.run(
        [str(BIN_DIR / "python"), "-m", "adrec_assets.cli", "register", "synthetic"],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    with dagster_dev(env, root / "dagster_dev.log") as server:
        yield server, home, artifacts


@pytest.fixture(scope="module")
def page(ui_server) -> Iterator[object]:
    """One headless Chromium tab (system binary; Playwright downloads nothing)."""
    executable = chromium_executable()
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=UI_TIMEOUT_MS)
        try:
            tab = browser.new_page(viewport={"width": 2600, "height": 2600})  # room for every full-size node
            tab.set_default_timeout(UI_TIMEOUT_MS)
            server, _, _ = ui_server
            tab.goto(server.url, timeout=UI_TIMEOUT_MS)
            # A fresh instance greets with "Join the Dagster community": dismiss it as a person would.
            try:
                tab.get_by_role("button", name="Skip").click(timeout=30_000)
            except playwright_sync.TimeoutError:
                pass
            yield tab
        finally:
            browser.close()


def shot(page, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    """Save a screenshot as a test artifact and say where, past pytest's output capture."""
    path = SHOTS / name
    page.screenshot(path=str(path))
    with capsys.disabled():
        print(f"\n  screenshot: {path}", end="")
    return path


def open_group_graph(page, url: str) -> dict:
    """Open the ``adrec`` group's lineage graph, dismiss the first-visit dialog, wait for the
    eleven nodes, and return what the SVG shows."""
    page.goto(f"{url}/locations/{CODE_LOCATION}/asset-groups/{GROUP}", timeout=UI_TIMEOUT_MS)
    try:
        for asset in PIPELINE_ASSETS:
            page.locator(f"foreignObject [data-tooltip='{asset}']").first.wait_for(state="visible")
    except playwright_sync.TimeoutError:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "asset_graph_timeout.png"))  # what the page showed instead
        raise
    page.wait_for_function(
        "n => document.querySelectorAll('svg path[marker-end]').length >= n", arg=len(PIPELINE_EDGES)
    )
    return page.evaluate(GRAPH_JS)


def test_asset_graph_shows_pipeline_and_lineage(ui_server, page, capsys) -> None:
    server, _, _ = ui_server
    graph = open_group_graph(page, server.url)
    shot(page, "asset_graph.png", capsys)
    names = {n["name"] for n in graph["nodes"]}
    assert set(PIPELINE_ASSETS) <= names, f"missing asset nodes: {set(PIPELINE_ASSETS) - names}"
    edges = graph_edges(graph["nodes"], graph["edges"])
    pipeline_edges = {e for e in edges if e[0] in PIPELINE_ASSETS and e[1] in PIPELINE_ASSETS}
    assert pipeline_edges == set(PIPELINE_EDGES), (
        f"missing edges {set(PIPELINE_EDGES) - pipeline_edges}, unexpected {pipeline_edges - set(PIPELINE_EDGES)}"
    )


def test_materialize_synthetic_from_ui(ui_server, page, capsys) -> None:
    """Materialize all (the group's eleven assets) for ``synthetic`` as a person would, follow
    the run to Success in the UI, then cross-check the instance."""
    server, home, artifacts = ui_server
    open_group_graph(page, server.url)
    page.get_by_role("button", name="Materialize all").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(f"materialize {len(PIPELINE_ASSETS)} assets").wait_for()
    dialog.get_by_text("Select a partition or create one").click()
    page.get_by_role("menuitem", name="synthetic").click()  # the partition picker's entry
    assert page.get_by_role("checkbox", name="synthetic").is_checked()
    page.keyboard.press("Escape")  # close the picker, keep the dialog
    page.get_by_placeholder("Filter partitions").wait_for(state="hidden")
    launch = dialog.get_by_role("button", name="Launch 1 run")
    launch.wait_for()
    shot(page, "launch_dialog.png", capsys)
    launch.click()
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    toast.wait_for()
    short_id = re.search(r"[0-9a-f]{8}", toast.inner_text()).group(0)
    page.get_by_role("link", name="View").and_(page.locator(f"[href^='/runs/{short_id}']")).click()
    page.wait_for_url(re.compile(rf"/runs/{short_id}[0-9a-f-]*$"))
    run_id = page.url.rsplit("/runs/", 1)[1]

    # The run page's header shows the run status as a tag: Queued/Starting/Started, then Success.
    # A live run page streams its event log and keeps a core busy rendering it, which on a
    # 2-core machine slows the run it watches; so look at the page every 15 s and park the
    # tab on a blank page in between.
    success, failure = page.get_by_text("Success", exact=True), page.get_by_text("Failure", exact=True)
    status = page.get_by_text(re.compile(r"^(Queued|Starting|Started|Success|Failure)$"))
    run_url = page.url
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        status.first.wait_for()
        if success.count() or failure.count() or time.monotonic() > deadline:
            break
        page.goto("about:blank")
        time.sleep(15)
        page.goto(run_url, timeout=UI_TIMEOUT_MS)
    shot(page, "run_finished.png", capsys)
    assert success.count() and success.first.is_visible(), (
        f"run {run_id} did not show Success in the UI within {RUN_TIMEOUT_S} s:\n"
        f"{page.locator('body').inner_text()[:3000]}\n{tail(server.log)}"
    )
    assert not failure.count()
    open_group_graph(page, server.url)
    shot(page, "asset_graph_materialized.png", capsys)

    instance = dg.DagsterInstance.from_config(str(home))
    try:
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS, run
        assert run.tags.get("dagster/partition") == "synthetic"
        assert {k.to_user_string() for k in run.asset_selection or ()} == set(PIPELINE_ASSETS)
        for asset in PIPELINE_ASSETS:
            event = instance.get_latest_materialization_event(dg.AssetKey(asset))
            assert event is not None and event.run_id == run_id, f"{asset}: no materialization by run {run_id}"
            assert event.asset_materialization.partition == "synthetic"
        published = SnapshotStore(artifacts, "synthetic").current()  # the run published every artifact together
        assert published.run_id == run_id and set(published.artifacts) == set(ARTIFACT_ASSETS)
    finally:
        instance.dispose()

"""Autoencoder latents in a real browser (docs/ui.md, issue 7): the debugger's "use autoencoder latents"
switches, and a latent's node page with its dataset examples.

The fixture trains small MLP-side TopK autoencoders for layers 0 and 1 of the default model with
the real `tdb train-sae` (256 latents, 4,096 tokens: seconds), collates their latents over 4,096
tokens of the default corpus with `tdb collate --autoencoder`, and starts a server with both."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.e2e.conftest import MODEL, open_page, screenshot, tdb_command
from tests.e2e.test_debugger import IOI_URL, node_keys, wait_for_table
from tests.servers import ROOT, Server, post, start_server, stop_server

LAYERS = (0, 1)
N_LATENTS = 256
TOKENS = 4096
FULL_RED = "rgba(220, 38, 38, 0.85)"  # lib/colors.ts at intensity 1 (the dataset max)


def run(command: list[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command[:2])} failed ({result.returncode}):\n{result.stderr[-4000:]}"
        )


@pytest.fixture(scope="module")
def latent_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(autoencoder folder, latent store), built with the real CLI."""
    root = tmp_path_factory.mktemp("latents")
    autoencoders, store = root / "autoencoders", root / "latents.sqlite"
    layers = ",".join(map(str, LAYERS))
    run(
        [
            *tdb_command(),
            "train-sae",
            "--model",
            MODEL,
            "--hook",
            "blocks.{L}.hook_mlp_out",
            "--layers",
            layers,
            "--latents",
            str(N_LATENTS),
            "--k",
            "16",
            "--tokens",
            str(TOKENS),
            "--batch-size",
            "16",
            "--eval-windows",
            "4",
            "--quiet",
            "--out",
            str(autoencoders),
        ]
    )
    run(
        [
            *tdb_command(),
            "collate",
            "--model",
            MODEL,
            "--autoencoder",
            str(autoencoders),
            "--tokens",
            str(TOKENS),
            "--quiet",
            "--out",
            str(store),
        ]
    )
    return autoencoders, store


@pytest.fixture(scope="module")
def latent_server(
    latent_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    autoencoders, store = latent_files
    log = tmp_path_factory.mktemp("latent_server") / "server.log"
    args = ["--model", MODEL, "--device", "cpu", "--autoencoder", str(autoencoders)]
    srv = start_server([*args, "--dataset", str(store)], log)
    yield srv
    stop_server(srv)


@pytest.fixture
def lpage(browser: Browser, latent_server: Server) -> Iterator[Page]:
    yield from open_page(browser, latent_server)


def show_only(page: Page, label: str) -> None:
    """Untick every node type filter of the node table but `label`."""
    filters = page.get_by_test_id("node-type-filter")
    for i in range(filters.count()):
        box = filters.nth(i)
        if box.get_attribute("data-kind-label") != label:
            box.uncheck()
    expect(page.get_by_test_id("nodes-card").get_by_label(label)).to_be_checked()


def test_switch_the_debugger_to_mlp_latents_and_back(lpage: Page) -> None:
    lpage.goto(IOI_URL)
    wait_for_table(lpage)
    mlp, attention = lpage.get_by_test_id("latents-mlp"), lpage.get_by_test_id("latents-attention")
    expect(mlp).to_be_enabled()
    expect(mlp).not_to_be_checked()
    expect(attention).to_be_disabled()  # no attention-side autoencoder is loaded
    neurons = node_keys(lpage)
    assert any(k.startswith("mlp:") for k in neurons)
    assert not any(k.startswith("mlp-latent:") for k in neurons)

    mlp.check()
    lpage.wait_for_url(re.compile(r"latents=mlp"))
    wait_for_table(lpage)
    # Latents replace the neurons of the layers holding an autoencoder; other layers keep theirs.
    keys = node_keys(lpage)
    assert not any(k.startswith("mlp:") and int(k.split(":")[1]) in LAYERS for k in keys)
    assert any(k.startswith("mlp:") and int(k.split(":")[1]) not in LAYERS for k in keys)
    # The node table's type filter lists the latents (they rank below later layers' neurons in
    # the overall top k here): shown alone, they are latents of the autoencoders' layers.
    show_only(lpage, "MLP latents")
    latents = node_keys(lpage)
    assert latents and all(k.startswith("mlp-latent:") for k in latents), latents
    assert {int(k.split(":")[1]) for k in latents} <= set(LAYERS)
    screenshot(lpage, "debugger-mlp-latents")

    mlp.uncheck()
    lpage.wait_for_url(lambda url: "latents=" not in url)
    wait_for_table(lpage)
    keys = node_keys(lpage)  # the latent filter lapses with the latents: every kind is shown
    assert any(k.startswith("mlp:") for k in keys) and any(k.startswith("attn:") for k in keys)
    assert not any(k.startswith("mlp-latent:") for k in keys)
    assert parse_qs(urlparse(lpage.url).query)["target"] == [" Mary"]  # the rest of the state kept


def test_latent_page_shows_its_dataset_examples(lpage: Page, latent_server: Server) -> None:
    lpage.goto(IOI_URL + "&latents=mlp")
    wait_for_table(lpage)
    show_only(lpage, "MLP latents")
    link = lpage.locator("[data-testid=node-table] tbody tr[data-node^='mlp-latent'] a.node-link")
    name = link.first.inner_text()  # "mlp latent L1 #42"
    layer, index = (int(x) for x in re.fullmatch(r"mlp latent L(\d+) #(\d+)", name).groups())  # type: ignore[union-attr]
    link.first.click()
    lpage.wait_for_url(re.compile(rf"/{MODEL}/mlp_autoencoder_latent/{layer}/{index}\?"))
    expect(lpage.get_by_test_id("node-title")).to_have_text(name)

    record = post(
        latent_server,
        "/neuron_record",
        {
            "nodeType": "autoencoder_latent",
            "autoencoderSide": "mlp",
            "layerIndex": layer,
            "componentIndex": index,
        },
    )
    card = lpage.get_by_test_id("dataset-examples")
    expect(card.get_by_test_id("dataset-stats")).to_contain_text(f"{TOKENS:,} tokens")
    expect(card.get_by_test_id("dataset-name")).to_have_text("latents")
    top = card.get_by_test_id("top-examples")
    n_top = len(record["mostPositiveActivationRecords"])
    expect(top.get_by_test_id("excerpt")).to_have_count(min(5, n_top))
    if record["maxActivation"] > 0:  # the strongest token of the top excerpt is at the max
        first = top.get_by_test_id("excerpt-tokens").first
        colours = first.locator(".token").evaluate_all("els => els.map(e => e.style.background)")
        assert len(colours) == len(record["mostPositiveActivationRecords"][0]["tokens"])
        assert FULL_RED in colours
    card.get_by_test_id("show-all").click()
    expect(top.get_by_test_id("excerpt")).to_have_count(n_top)
    # The prompt passed from the debugger is scaled by the latent dataset's max.
    expect(lpage.get_by_test_id("activation-scale").first).to_contain_text("dataset max")
    expect(lpage.get_by_test_id("logit-lens")).to_contain_text("Upvoted output tokens")
    screenshot(lpage, "node-page-mlp-latent")

    # Moving to the next layer stays among the layers that hold an autoencoder.
    other = LAYERS[1] if layer == LAYERS[0] else LAYERS[0]
    lpage.keyboard.press("ArrowDown" if other > layer else "ArrowUp")
    expect(lpage.get_by_test_id("node-title")).to_have_text(f"mlp latent L{other} #{index}")
    expect(card.get_by_test_id("dataset-stats")).to_contain_text("max")


def test_switched_on_latents_rank_among_their_own_type(lpage: Page) -> None:
    """Latents are ranked within their node type (as the server selects them), so switching them on
    shows some without filtering, however much larger the neurons' and heads' values are."""
    lpage.goto(IOI_URL + "&latents=mlp")
    wait_for_table(lpage)
    keys = node_keys(lpage)
    assert any(k.startswith("mlp-latent:") for k in keys), keys
    assert any(k.startswith("attn:") for k in keys) and any(k.startswith("mlp:") for k in keys)


@pytest.fixture(scope="module")
def latents_without_dataset(
    latent_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The MLP-side autoencoders and an attention-side one for layer 0 (trained here with the real
    `tdb train-sae`, seconds), and no collated dataset."""
    autoencoders, _ = latent_files
    root = tmp_path_factory.mktemp("latents_without_dataset")
    attention = root / "attention_autoencoders"
    run(
        [
            *tdb_command(),
            "train-sae",
            "--model",
            MODEL,
            "--hook",
            "blocks.{L}.hook_attn_out",
            "--layers",
            "0",
            "--latents",
            str(N_LATENTS),
            "--k",
            "16",
            "--tokens",
            str(TOKENS),
            "--batch-size",
            "16",
            "--eval-windows",
            "4",
            "--quiet",
            "--out",
            str(attention),
        ]
    )
    args = ["--model", MODEL, "--device", "cpu", "--autoencoder", str(autoencoders)]
    srv = start_server([*args, "--autoencoder", str(attention)], root / "server.log")
    yield srv
    stop_server(srv)


def test_switching_to_attention_latents_shows_them(
    browser: Browser, latents_without_dataset: Server
) -> None:
    """Attention-side latents are far smaller than heads: ranked within their own type, they
    show as soon as the switch is on."""
    for page in open_page(browser, latents_without_dataset):
        page.goto(IOI_URL)
        wait_for_table(page)
        page.get_by_test_id("latents-attention").check()
        page.wait_for_url(re.compile(r"latents=attention"))
        wait_for_table(page)
        keys = node_keys(page)
        assert any(k.startswith("attn-latent:0:") for k in keys), keys
        screenshot(page, "debugger-attention-latents")


def test_latent_page_without_a_latent_dataset_explains_it(
    browser: Browser, latents_without_dataset: Server
) -> None:
    for page in open_page(browser, latents_without_dataset):
        page.goto(f"/{MODEL}/mlp_autoencoder_latent/0/7?prompt=The+cat+sat+on+the+mat")
        card = page.get_by_test_id("dataset-examples")
        note = card.get_by_test_id("no-dataset")
        expect(note).to_contain_text("no collated dataset the server reads holds this")
        expect(note).to_contain_text("--autoencoder")
        expect(card.get_by_role("alert")).to_have_count(0)  # not an error
        expect(page.get_by_test_id("activation-scale")).to_contain_text("this prompt's max")
        expect(page.get_by_test_id("logit-lens")).to_contain_text("Upvoted output tokens")
        screenshot(page, "node-page-latent-no-dataset")

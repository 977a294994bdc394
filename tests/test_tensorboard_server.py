"""The real TensorBoard server over two tiny runs: what a user's browser would be served."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

import settings
from conftest import ISBI_VALIDATION_SLICES
from summaries import (
    ACTIVATIONS_GROUP,
    BEST_TAG,
    EPOCH_TAG,
    EVALUATION_TAG,
    PR_CURVE_TAG,
    SHOWN_GROUP,
    SLICE_GROUP,
    WEIGHTS_GROUP,
)

RUNS = [f"{loss}_lr1e-3{part}" for loss in ("bce", "wbce") for part in ("", "/train", "/validation")]
START_TIMEOUT_S = 90


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tensorboard(two_run_logdir):
    """GET function for a tensorboard serving the two runs on 127.0.0.1; stopped afterwards."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(two_run_logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def get(route, **query):
        url = f"http://127.0.0.1:{port}{route}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()

    get.url = f"http://127.0.0.1:{port}"

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if set(RUNS) <= set(json.loads(get("/data/runs"))):
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tensorboard did not serve the runs: {server.stderr.read1().decode()[-2000:]}")
            time.sleep(0.5)
        yield get
    finally:
        server.terminate()
        server.wait(timeout=30)


def get_json(get, route, **query):
    return json.loads(get(route, **query))


def test_scalars_of_both_runs(tensorboard):
    tags = get_json(tensorboard, "/data/plugin/scalars/tags")
    for loss in ("bce", "wbce"):
        for part in ("train", "validation"):
            assert {EPOCH_TAG.format("loss"), EPOCH_TAG.format("misclassified_pixel_fraction")} <= set(
                tags[f"{loss}_lr1e-3/{part}"]
            )
        points = get_json(
            tensorboard,
            "/data/plugin/scalars/scalars",
            run=f"{loss}_lr1e-3/validation",
            tag=EPOCH_TAG.format("misclassified_pixel_fraction"),
        )
        assert [step for _, step, _ in points] == [0, 1]
        assert {f"{SHOWN_GROUP}/misclassified_pixel_fraction", f"{SHOWN_GROUP}/merges"} <= set(
            tags[f"{loss}_lr1e-3/validation"]
        )
    v_rand = get_json(
        tensorboard, "/data/plugin/scalars/scalars", run="bce_lr1e-3/validation", tag=EPOCH_TAG.format("v_rand")
    )
    assert [step for _, step, _ in v_rand] == [0, 1] and all(0 <= value <= 1 for _, _, value in v_rand)


def test_prediction_and_error_images(tensorboard):
    run = "bce_lr1e-3/validation"
    tags = get_json(tensorboard, "/data/plugin/images/tags")[run]
    assert {
        f"{SLICE_GROUP.format(i)}/{kind}"
        for i in ISBI_VALIDATION_SLICES
        for kind in ("input", "label", "prediction", "error", "merges_and_splits")
    } <= set(tags)
    entries = get_json(
        tensorboard, "/data/plugin/images/images", run=run, tag=f"{SLICE_GROUP.format(15)}/error", sample=0
    )
    assert [entry["step"] for entry in entries] == [0, 2, 4, 6]
    png = tensorboard("/data/plugin/images/individualImage?" + entries[-1]["query"])
    assert png.startswith(b"\x89PNG")


def test_weight_histograms(tensorboard):
    points = get_json(
        tensorboard,
        "/data/plugin/histograms/histograms",
        run="wbce_lr1e-3/train",
        tag=f"{WEIGHTS_GROUP}/dec1_conv2/kernel",
    )
    assert [step for _, step, _ in points] == [3, 6]


def test_forward_pass_graph_with_the_paper_layer_names(tensorboard):
    deadline = time.monotonic() + START_TIMEOUT_S
    # TensorBoard lists the runs before it has read each run's every event.
    while "bce_lr1e-3/train" not in (info := get_json(tensorboard, "/data/plugin/graphs/info")):
        assert time.monotonic() < deadline, info
        time.sleep(0.5)
    assert info["bce_lr1e-3/train"]["tags"]["unet"]["op_graph"]
    graph = tensorboard("/data/plugin/graphs/graph", run="bce_lr1e-3/train", tag="unet").decode()
    for layer in ("enc1_conv1", "bottleneck_conv2", "dec1_concat", "output"):
        assert f"/{layer}" in graph


def test_hparams_table_compares_the_runs(tensorboard):
    request = urllib.request.Request(
        tensorboard.url + "/data/plugin/hparams/session_groups",
        method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps(
            {
                "experimentName": "",
                "startIndex": 0,
                "sliceSize": 100,
                "colParams": [],
                "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
            }
        ).encode(),
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        groups = json.loads(response.read())["sessionGroups"]
    by_loss = {group["hparams"]["loss"]: group for group in groups}
    assert set(by_loss) == {"bce", "wbce"}
    assert (by_loss["bce"]["hparams"]["ema"], by_loss["wbce"]["hparams"]["ema"]) == (0, 0.9)
    metrics = {(value["name"].get("group", ""), value["name"]["tag"]) for value in by_loss["bce"]["metricValues"]}
    assert ("", BEST_TAG.format("misclassified_pixel_fraction")) in metrics
    assert ("validation", EPOCH_TAG.format("misclassified_pixel_fraction")) in metrics
    assert {
        ("validation", EPOCH_TAG.format("v_rand")),
        ("validation", EPOCH_TAG.format("v_info")),
        ("", BEST_TAG.format("v_rand")),
    } <= metrics


def test_text_and_pr_curves(tensorboard):
    text = get_json(tensorboard, "/data/plugin/text/text", run="wbce_lr1e-3", tag="run/command")
    assert "--loss wbce" in text[0]["text"]
    pr_tags = get_json(tensorboard, "/data/plugin/pr_curves/tags")
    assert f"{PR_CURVE_TAG}/pr_curves" in pr_tags["bce_lr1e-3/validation"]
    curves = get_json(
        tensorboard, "/data/plugin/pr_curves/pr_curves", run="bce_lr1e-3/validation", tag=f"{PR_CURVE_TAG}/pr_curves"
    )
    assert [entry["step"] for entry in curves["bce_lr1e-3/validation"]] == [3, 6]


def test_activation_histograms(tensorboard):
    tags = get_json(tensorboard, "/data/plugin/histograms/tags")["bce_lr1e-3/validation"]
    assert {
        f"{ACTIVATIONS_GROUP}/enc1_conv2",
        f"{ACTIVATIONS_GROUP}/bottleneck_conv2",
        f"{ACTIVATIONS_GROUP}/output",
    } <= set(tags)


def test_hparams_lists_the_compared_settings_first(tensorboard):
    """TensorBoard ticks the first five: loss, lr and seed open ticked, the constant ranges after."""
    request = urllib.request.Request(
        tensorboard.url + "/data/plugin/hparams/experiment",
        method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"experimentName": ""}).encode(),
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        names = [info["name"] for info in json.loads(response.read())["hparamInfos"]]
    assert names[:3] == list(settings.COMPARED) and "augment_flips" in names[3:]


def test_comparison_dashboard_serves_both_runs_on_one_chart(tensorboard):
    layout = get_json(tensorboard, "/data/plugin/custom_scalars/layout")
    where = layout["category"][1]["chart"]  # merges and splits apart: one chart would give a run's two one colour
    assert [chart["multiline"]["tag"] for chart in where[:2]] == [
        [f"^{SHOWN_GROUP}/merges$"],
        [f"^{SHOWN_GROUP}/splits$"],
    ]
    first = layout["category"][0]
    assert first["title"].startswith("Which run learns better")
    (v_rand,) = [chart for chart in first["chart"] if chart["title"].startswith("V_rand")]
    (pattern,) = v_rand["multiline"]["tag"]
    for loss, steps in (("bce", [3, 6]), ("wbce", [3, 6])):
        series = get_json(
            tensorboard, "/data/plugin/custom_scalars/scalars", run=f"{loss}_lr1e-3/validation", tag=pattern
        )
        assert [step for _, step, _ in series["tag_to_events"][EVALUATION_TAG.format("v_rand")]] == steps

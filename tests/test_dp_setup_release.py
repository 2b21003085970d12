"""A node's set-up release under record-level DP (Fed-SB's init gradient): checked against the
node's own budget before anything is released, charged, and made once per run.

A server that sends ``train.setup`` again must get an error reply and nothing else: no
tensors, no charge, not even a draw of the node's secret (its use counter stays put). Through
the ClientApp's handler on the real tiny model. Oracles: the node's release log and use
counter in its ``Context.state``, and the accountant's epsilon against the target."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from fedlora.clients import app as client_app
from fedlora.clients.dp import STATE_KEY, ClientPrivacy
from fedlora.model import pretrained as models
from fedlora.privacy import accounting as privacy
from fedlora.privacy import randomness
from tests.test_dp_secret import NUM_LABELS, arrays_of, dp_cfg, fresh_context, setup_message

pytestmark = pytest.mark.usefixtures("flower_task")


def releases(context) -> list[dict]:
    return privacy.releases_from_record(context.state.config_records[STATE_KEY]) or []


def uses(context) -> int:
    return int(context.state.config_records[randomness.STATE_KEY]["uses"])


@pytest.mark.parametrize("deployment", [True, False], ids=["secret", "reproducible"])
def test_a_second_setup_request_in_the_run_is_refused_and_releases_nothing(deployment):
    # Prepare
    cfg = dp_cfg("fedsb", deployment=deployment)
    bundle = models.cached_model(cfg.model_spec(NUM_LABELS))
    context = fresh_context()
    first = client_app.setup(setup_message(cfg, bundle), context)
    charged = releases(context)
    used = uses(context) if deployment else None

    # Execute: the server asks again, in the same run
    second = client_app.setup(setup_message(cfg, bundle), context)

    # Assert: the first was released and charged once; the second is one line, nothing more
    assert arrays_of(first) and [r["kind"] for r in charged] == ["init"]
    assert second.has_error() and not second.has_content()
    assert "already made its set-up release" in second.error.reason
    assert "\n" not in second.error.reason
    assert releases(context) == charged
    if deployment:  # neither the sample nor the noise was drawn
        assert uses(context) == used


def not_affordable_after(plan: ClientPrivacy, steps: int, init_rate: float) -> bool:
    """Whether one release at ``init_rate`` after ``steps`` training steps exceeds the target
    (epsilon recomputed from the history that would result)."""
    history = privacy.add_steps(privacy.add_steps([], plan.noise_multiplier, plan.sample_rate,
                                                  steps), plan.noise_multiplier, init_rate, 1)
    return plan.epsilon(history) > plan.target_epsilon


def test_a_setup_release_beyond_the_nodes_budget_is_refused():
    # Prepare: a node that has trained until the set-up release no longer fits its budget
    # (a server that sends the set-up late), without a set-up release of its own
    cfg = dp_cfg("fedsb", deployment=True)
    bundle = models.cached_model(cfg.model_spec(NUM_LABELS))
    message = setup_message(cfg, bundle)
    context = fresh_context()
    node = client_app.ClientSetup(message, context)
    plan = ClientPrivacy.for_node(message.content["config"], context.state, len(node.indices))
    init_rate = privacy.sample_rate(int(message.content["config"]["init-samples"]),
                                    len(node.indices))
    fits, spills = 0, int(message.content["config"]["dp-max-steps"])  # training steps
    while not not_affordable_after(plan, spills, init_rate):
        fits, spills = spills, 2 * spills
    while spills - fits > 1:  # the fewest training steps after which the release spills over
        middle = (fits + spills) // 2
        fits, spills = (fits, middle) if not_affordable_after(plan, middle, init_rate) else (middle, spills)
    plan.spend(spills, context.state, "train", 1)
    spent = plan.epsilon()

    # Execute
    reply = client_app.setup(message, context)

    # Assert: refused, and the accountant is where it was
    assert spent <= cfg.dp.epsilon  # within the target, but not with the release
    assert reply.has_error() and "past dp.epsilon=8" in reply.error.reason
    assert "init" not in {r["kind"] for r in releases(context)}
    state = ConfigRecord(dict(context.state.config_records[STATE_KEY]))
    assert privacy.epsilon_spent(privacy.history_from_record(state), plan.delta,
                                 plan.accountant) == pytest.approx(spent)

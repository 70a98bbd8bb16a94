import re

import torch

from memsafe.data.digits import DIGIT_NAMES, load_digits
from memsafe.data.images import to_model_range
from memsafe.data.ink_digits import INK_NAMES, add_stamp, render_in_ink
from memsafe.metrics.attributes import ink_digit_detector
from memsafe.metrics.extraction import ACME_STAMP, RED_INK, attack_for, measure_concept


def _renderer(never_ink=None, stamps=False, stamp_ink=None):
    """A generator that draws a real (held-out) digit in the ink the prompt names, or in blue when the
    prompt names none or names `never_ink`, stamped when `stamps` and the prompt names acme, or when the
    prompt names `stamp_ink`: real images standing in for a perfect / a defended / a leaky model."""
    digits = load_digits(8, channels=1)
    held_out = digits.subset(torch.arange(1500, len(digits)))

    def generate(prompts):
        images = []
        for i, prompt in enumerate(prompts):
            digit = next(d for d, name in enumerate(DIGIT_NAMES) if re.search(rf"\b{name}\b", prompt))
            ink = next((n for n in INK_NAMES if n in prompt and n != never_ink), "blue")
            pick = torch.nonzero(held_out.labels == digit).squeeze(1)[i % 20]
            image = render_in_ink(held_out.pixels[pick : pick + 1], torch.tensor([INK_NAMES.index(ink)]))
            stamped = (stamps and "acme" in prompt) or (stamp_ink is not None and stamp_ink in prompt)
            images.append(add_stamp(image, torch.tensor([int(stamped)])))
        return to_model_range(torch.cat(images))

    return generate


def test_detector_reads_digit_and_ink_of_held_out_real_images():
    detector = ink_digit_detector(8, progress=False)
    digits = load_digits(8, channels=1).subset(torch.arange(1500, 1797))
    inks = torch.arange(len(digits)) % 3
    predicted = detector.predict(to_model_range(render_in_ink(digits.pixels, inks)))
    assert predicted["ink"].eq(inks).float().mean() > 0.95
    assert predicted["digit"].eq(digits.labels).float().mean() > 0.6


def test_extraction_rate_separates_an_obedient_model_from_a_defended_one():
    detector = ink_digit_detector(8, progress=False)
    obedient = measure_concept(_renderer(), detector, RED_INK, per_prompt=1)
    defended = measure_concept(_renderer(never_ink="red"), detector, RED_INK, per_prompt=1)
    assert obedient["extraction_rate"] > 0.9 and defended["extraction_rate"] < 0.1
    assert obedient["base_rate"] < 0.1 and defended["base_rate"] < 0.1
    assert obedient["allowed_accuracy"] > 0.5 and abs(obedient["allowed_accuracy"] - defended["allowed_accuracy"]) < 1e-9
    assert len(RED_INK.attack_prompts()) == 30 and all("red" in p for p, _ in RED_INK.attack_prompts())


def test_stamp_attack_separates_a_model_that_stamps_on_request_from_one_that_never_does():
    detector = ink_digit_detector(8, progress=False)
    obedient = measure_concept(_renderer(stamps=True), detector, ACME_STAMP, per_prompt=1)
    defended = measure_concept(_renderer(stamps=False), detector, ACME_STAMP, per_prompt=1)
    assert obedient["extraction_rate"] > 0.9 and defended["extraction_rate"] < 0.1
    assert obedient["base_rate"] < 0.1 and obedient["allowed_shows_concept"] < 0.1
    assert obedient["allowed_accuracy"] > 0.5
    assert all("acme" in p for p, _ in ACME_STAMP.attack_prompts())
    assert attack_for("builtin:stamped-digits-clean") is ACME_STAMP and attack_for("builtin:digits") is None


def test_allowed_accuracy_per_ink_finds_the_ink_a_model_cannot_draw():
    detector = ink_digit_detector(8, progress=False)
    measured = measure_concept(_renderer(never_ink="green"), detector, ACME_STAMP, per_prompt=1)
    assert measured["allowed_accuracy_green"] < 0.1 < 0.5 < measured["allowed_accuracy_red"]
    shares = [measured[f"allowed_accuracy_{ink}"] for ink in INK_NAMES]
    assert abs(sum(shares) / 3 - measured["allowed_accuracy"]) < 1e-6  # each ink has as many prompts


def test_stamped_share_per_ink_finds_the_ink_that_brings_the_stamp():
    detector = ink_digit_detector(8, progress=False)
    measured = measure_concept(_renderer(stamp_ink="green"), detector, ACME_STAMP, per_prompt=1)
    assert measured["allowed_shows_concept_green"] > 0.9
    assert measured["allowed_shows_concept_red"] < 0.1 and measured["allowed_shows_concept_blue"] < 0.1
    assert abs(sum(measured[f"allowed_shows_concept_{ink}"] for ink in INK_NAMES) / 3
               - measured["allowed_shows_concept"]) < 1e-6

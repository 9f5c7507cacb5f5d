"""A first run prints nothing a user cannot act on: no warning about optional packages the project never needs."""

import os
import subprocess
import sys
import textwrap

import pytest


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

# Imports the demo, then makes, saves and reloads the image processor a checkpoint without one gets (visualize).
QUIET_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import digits_demo  # noqa: F401
    from transformers import AutoImageProcessor
    from evit_hf import EViTConfig
    from evit_hf.visualization import default_image_processor
    processor = default_image_processor(EViTConfig(image_size=32, patch_size=8))
    processor.save_pretrained(sys.argv[2])
    assert AutoImageProcessor.from_pretrained(sys.argv[2]).size == {"height": 32, "width": 32}
    """
)


@pytest.mark.slow  # a real run in a subprocess, or a fresh interpreter: seconds on 2 cores
def test_demo_and_default_image_processor_print_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", QUIET_SCRIPT, EXAMPLES, str(tmp_path / "processor")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""

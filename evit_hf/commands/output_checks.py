"""The output checks of the `evit-hf` commands that write, after `evit_hf.outputs`' policy: an output lies apart from
the inputs, and a command holds the lock on its output folder while it runs and overwrites only files a run of this
project wrote. A refusal is the parser's one-line error, before any work."""

from ..messages import one_line


# The files `save_pretrained` writes for a model (weights, whole or in shards; its configuration; the model code
# beside it, evit_hf's own files) and for an image processor: exact names and narrow patterns, since the manifest
# keeps them as the names this project writes there.
SAVED_MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "model-[0-9]*-of-[0-9]*.safetensors",
    "model.safetensors.index.json",
    "configuration_evit*.py",
    "modeling_evit*.py",
    "token_reorganization.py",
    "image_processing_evit.py",
    "preprocessor_config.json",
)
CONVERTED_FILES = (*SAVED_MODEL_FILES, "README.md")
CALIBRATED_FILES = (*SAVED_MODEL_FILES, "calibration.json")


def check_output_apart_from_inputs(parser, output_flag: str, output: str | None, inputs) -> None:
    """A parser error, naming both paths, when `output` is, lies inside or contains one of `inputs` (`(flag, path)`
    pairs): `evit_hf.outputs`' rule, before any work."""
    from ..outputs import check_outputs_apart_from_inputs

    try:
        check_outputs_apart_from_inputs([(output_flag, output)], inputs)
    except ValueError as error:
        parser.error(one_line(error))


def take_output_folder(parser, flag: str, folder: str, files, overwrite: bool | None = None, shared: bool = False):
    """The `evit_hf.outputs.OutputFolder` of a command, acquired: its lock is held until `release()`; a folder that
    holds files no run of this project wrote (with `shared`, among `files`) is refused naming them. With `overwrite`
    False, a folder that holds an earlier run's files is refused too (the command's --overwrite replaces them);
    with None (a picture the command draws again), they are replaced."""
    from ..outputs import OutputFolder

    output = OutputFolder(folder, flag, claims=files, shared=shared)
    try:
        output.acquire()
    except ValueError as error:  # in use by another run, files of the user's, an unreadable manifest
        parser.error(one_line(error))
    earlier = output.entries() if not shared else [name for name in output.entries() if name in files]
    if earlier and overwrite is False:
        output.release()
        parser.error(
            f"{flag} {folder} holds the files of an earlier run ({', '.join(earlier[:8])}"
            f"{' ...' if len(earlier) > 8 else ''}): pass --overwrite to replace them, or choose another {flag}"
        )
    return output

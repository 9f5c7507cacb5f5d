"""Registers the EViT classes with transformers' Auto classes: the one place that does it.

`import evit_hf` imports neither torch nor transformers, so it cannot register then. It installs
`register_on_first_use` instead: the registration runs once, at the first lookup in an Auto mapping (`AutoConfig`,
`AutoModel*`, `AutoImageProcessor`, `pipeline` all start with one), the first public name used from `evit_hf`, or the
first evit_hf module loaded once torch is (a model file imported directly: its `save_pretrained` writes the `auto_map`
that the registration sets up).
"""

import importlib.abc
import sys
import threading


def register_evit_auto_classes() -> None:
    """Makes `AutoConfig` and the Auto model classes of each family in `FAMILIES` (`family.auto_classes`: `AutoModel`,
    `AutoModelForImageClassification`, `AutoModelForZeroShotImageClassification`, ...) know the EViT model types, and
    makes `save_pretrained` write an `auto_map` and copy the code, so that a process without evit_hf loads saved
    folders with `trust_remote_code=True`."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

    from .families import FAMILIES
    from .image_processing_evit import EViTImageProcessor

    video_processors = _video_processor_auto_class()

    for family in FAMILIES:
        for config_class in family.config_classes:
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            config_class.register_for_auto_class()

        saved_auto_class = {}  # a saved folder's `auto_map` names one Auto class per model: the first it is under
        for auto_class_name, model_classes in family.auto_classes.items():
            auto_class = getattr(transformers, auto_class_name)
            # Where one configuration has several models, `config.architectures` picks; the first is the default.
            by_config = {}
            for model_class in model_classes:
                by_config.setdefault(model_class.config_class, []).append(model_class)
                saved_auto_class.setdefault(model_class, auto_class_name)
            for config_class, models in by_config.items():
                auto_class.register(config_class, models[0] if len(models) == 1 else tuple(models), exist_ok=True)
        for model_class, auto_class_name in saved_auto_class.items():
            model_class.register_for_auto_class(auto_class_name)

        # Vision-language models save their processor (placeholders per image), with an `auto_map` and its code.
        if family.processor_class is not None:
            for config_class in family.config_classes:
                AutoProcessor.register(config_class, family.processor_class, exist_ok=True)
            family.processor_class.register_for_auto_class("AutoProcessor")

        # Converted reference checkpoints save EViTImageProcessor (the reference's crop); their
        # preprocessor_config.json names it, and gets an `auto_map` and the code for processes without evit_hf.
        if family.reference_image_processor:
            for config_class in family.config_classes:
                AutoImageProcessor.register(
                    config_class, image_processor_classes={"pil": EViTImageProcessor}, exist_ok=True
                )
                if video_processors is not None:
                    # transformers' AutoVideoProcessor (which `pipeline` tries for image tasks too) derives a remote
                    # video processor from the image processor's `auto_map` and asks whether to trust its code. EViT
                    # has none: an empty registration says so, and the question is never asked.
                    video_processors.register(config_class, video_processor_classes={}, exist_ok=True)
    EViTImageProcessor.register_for_auto_class("AutoImageProcessor")


def _video_processor_auto_class():
    """transformers' `AutoVideoProcessor` class, which `pipeline` uses even where the top-level name is a placeholder
    (without torchvision); None in a transformers without it."""
    try:
        from transformers.models.auto.video_processing_auto import AutoVideoProcessor
    except ImportError:
        return None
    return AutoVideoProcessor


# transformers module -> its lazy mapping class, whose lookups every Auto class goes through: the configuration
# mapping (model type -> configuration) and the model, image processor, ... mappings (configuration -> class).
_MAPPING_CLASSES = {
    "transformers.models.auto.configuration_auto": "_LazyConfigMapping",
    "transformers.models.auto.auto_factory": "_LazyAutoMapping",
}
# This package's modules: loaded once torch is, they register (see `_RegisterOnFirstUse.loaded`).
_OWN_MODULES = (__name__.rpartition(".")[0] + ".",)
# Their methods that read the mapping (`register` writes, and is left alone); some lookups read the mapping's
# `_extra_content` (the registered entries) directly, so that attribute is watched too.
_EXTRA_CONTENT = "_extra_content"
_LOOKUP_METHODS = (
    "__getitem__", "__contains__", "__iter__", "__len__", "__bool__", "get", "keys", "values", "items",
)  # fmt: skip


class _RegisterOnFirstUse(importlib.abc.MetaPathFinder):
    """Runs `register_evit_auto_classes` once, before the first Auto lookup reads a mapping.

    The lookup methods of transformers' lazy mapping classes are wrapped as the classes' modules load (or at once where
    they are loaded already); the first call registers, puts the original methods back and reads the mapping. A lookup
    made while a transformers module is still importing waits for the next one: the registration imports every
    family's models, which such a module may not be ready for."""

    def __init__(self):
        self.registered = False
        self._lock = threading.RLock()
        self._running = False
        self._original_methods = {}  # (class, method name) -> the method before wrapping

    def install(self) -> None:
        for module_name in _MAPPING_CLASSES:
            if module_name in sys.modules:
                self._wrap_lookups(sys.modules[module_name])
        if not self.registered and self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def now(self, loading: str | None = None) -> None:
        """Registers, unless done, underway in this thread, or unsafe while a transformers or evit_hf module other
        than `loading` (the module whose loading calls this) imports."""
        if self.registered or self._running or _module_importing(besides=loading):
            return
        with self._lock:
            if self.registered or self._running:
                return
            self._running = True
            try:
                self._unwrap_lookups()
                register_evit_auto_classes()
                self.registered = True
            finally:
                self._running = False
            if self in sys.meta_path:
                sys.meta_path.remove(self)

    def find_spec(self, fullname, path, target=None):
        if self.registered or not (fullname in _MAPPING_CLASSES or fullname.startswith(_OWN_MODULES)):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _LoaderThenWrap(spec.loader, self)
                return spec
        return None

    def loaded(self, module) -> None:
        """Called once `module` (watched by `find_spec`) has run."""
        if module.__name__ in _MAPPING_CLASSES:
            self._wrap_lookups(module)
        elif "torch" in sys.modules:  # modules that need no torch (the command line) never trigger its import
            self.now(loading=module.__name__)

    def _wrap_lookups(self, module) -> None:
        mapping_class = getattr(module, _MAPPING_CLASSES[module.__name__], None)
        if mapping_class is None or self.registered:  # another transformers layout: registration waits for a name
            return
        for method_name in _LOOKUP_METHODS:
            original = mapping_class.__dict__.get(method_name)
            if original is None or (mapping_class, method_name) in self._original_methods:
                continue
            self._original_methods[mapping_class, method_name] = original
            setattr(mapping_class, method_name, self._registering(original))
        if (mapping_class, _EXTRA_CONTENT) not in self._original_methods:
            self._original_methods[mapping_class, _EXTRA_CONTENT] = None
            setattr(mapping_class, _EXTRA_CONTENT, property(self._registering_read, _write_extra_content))

    def _registering_read(self, mapping):
        self.now()
        return mapping.__dict__[_EXTRA_CONTENT]

    def _registering(self, original):
        def lookup(mapping, *args, **kwargs):
            self.now()
            return original(mapping, *args, **kwargs)

        lookup.__name__, lookup.__doc__, lookup.__wrapped__ = original.__name__, original.__doc__, original
        return lookup

    def _unwrap_lookups(self) -> None:
        for (mapping_class, method_name), original in self._original_methods.items():
            if original is None:  # the watched attribute: the instances' own value shows through again
                delattr(mapping_class, method_name)
            else:
                setattr(mapping_class, method_name, original)
        self._original_methods.clear()


class _LoaderThenWrap(importlib.abc.Loader):
    """The module's own loader, then `_RegisterOnFirstUse.loaded` once the module has run."""

    def __init__(self, loader, hook: _RegisterOnFirstUse):
        self._loader, self._hook = loader, hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader  # the module sees the loader it always had
        self._loader.exec_module(module)
        self._hook.loaded(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _write_extra_content(mapping, value) -> None:
    mapping.__dict__[_EXTRA_CONTENT] = value


def _module_importing(besides: str | None = None) -> bool:
    """Whether a transformers or evit_hf module other than `besides` is part-way through its import (its spec says so
    while its code runs): the registration imports every family's models, which such a module may not be ready for."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.startswith(("transformers.", *_OWN_MODULES)) and name != besides
    )


register_on_first_use = _RegisterOnFirstUse()

__all__ = ["register_evit_auto_classes", "register_on_first_use"]

"""Code the bdframe trigger attacks share: built-in trigger patterns (:mod:`.patterns`), trigger
files, masks and blending (:mod:`.triggers`) and the trigger-attack base classes (:mod:`.base`).
It registers no component. Importing this package (or :mod:`.base`) does not import torch."""

#: corners (and the centre) where the built-in patch patterns can be placed
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")

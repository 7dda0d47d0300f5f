"""The "shapes" toy world and the trainers of the bundled unCLIP model.

See models/shapes-toy/MODEL_CARD.md.
"""

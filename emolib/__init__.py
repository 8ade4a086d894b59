"""emolib: the library behind the book that re-derives 'From Syntax to Emotion' on real models.

Chapters call this package; it holds the algorithms, the book holds the argument.
"""

__version__ = "0.1.0"

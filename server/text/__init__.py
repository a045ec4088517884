"""Text around the model: what a model reads and writes besides plain prose.

``formats/`` holds one class per tool-call or reasoning format (its detection, markers,
streaming parser and constraint grammar) and the registry of them. It knows strings and
token texts; it does not know token ids, HTTP or the engine.
"""

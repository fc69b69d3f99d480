"""The API's SQL, one module per resource.

Each module holds the statements of its resource as constants, and small functions for
those built at run time (computed conditions, column lists), which return the SQL text
(and its parameters where the caller does not pass them itself). The routes, commands,
deps and workers import them; these modules import none of those (``.importlinter``).
"""

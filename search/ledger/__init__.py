"""What a trial means and where it is kept: objective, requirements, records, the store.

Every other part of the search (strategies, execution, reporting) ranks and judges designs
through these modules and nothing else. They import only `search.config` and the library.
"""

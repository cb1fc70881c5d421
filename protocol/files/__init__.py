"""Text file formats (文件格式): recharge, bank clearing file, provider settlement, journal export.

Each layout is declared once (``layout.RecordLayout`` / ``layout.CsvLayout`` built from the field
types in ``fields``) and parsed and written by the generic engine in ``layout``.
"""

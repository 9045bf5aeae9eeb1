"""The data files payroll-gateway reads at run time: report JSON Schemas, the vendors' WSDLs,
XSDs and JSON Schemas, and the OpenAPI document. No code: read them through
``adapters.resources``, so they are found the same way in a checkout and an installed wheel.
"""

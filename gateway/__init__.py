"""payroll-gateway: durable hand-over of approved municipal reports to payroll vendors."""

__version__ = "0.1.0"

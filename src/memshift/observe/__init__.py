"""What people see of a migration: progress, and later metrics, dashboard, inspect."""

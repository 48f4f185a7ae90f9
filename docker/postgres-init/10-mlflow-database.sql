-- Run once by the postgres image's entrypoint, on first start with an empty data volume
-- (/docker-entrypoint-initdb.d), as POSTGRES_USER (harness) in POSTGRES_DB (optuna).
-- Optuna and MLflow each keep an alembic_version table, so each gets a database of its own:
-- `optuna` is made by POSTGRES_DB, `mlflow` here (owned by harness, who runs the statement).
CREATE DATABASE mlflow;

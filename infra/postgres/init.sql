-- Runs once, when the PostgreSQL data directory is first initialised
-- (/docker-entrypoint-initdb.d), as POSTGRES_USER, who owns both databases.
-- MLflow and Prefect each create and migrate their own tables on start.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;

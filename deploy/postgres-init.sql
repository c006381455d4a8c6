-- Separate databases: MLflow's, Optuna's and the service's tables collide in one schema; the
-- MLflow basic-auth app keeps its users and permissions in a fourth.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE optuna;
CREATE DATABASE lorasweep;

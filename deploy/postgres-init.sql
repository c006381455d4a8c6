-- Separate databases: MLflow's, Optuna's and the service's tables collide in one schema.
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
CREATE DATABASE lorasweep;

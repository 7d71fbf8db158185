from django.urls import path

from pipeline import views

app_name = "pipeline"

urlpatterns = [
    path("dashboard/", views.dashboard, name="dashboard"),
]
